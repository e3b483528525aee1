"""Generate the benchmark's bf16 Llama bases (~0.5B, ~1.5B) and an r=16 all-linear LoRA for each, with numpy.

Random weights written straight through :class:`include.merge.writer.ShardedWriter` (no torch, no
transformers init), so a 1.5B model takes seconds. Cached under ``~/.cache/lora-deploy/bench-models``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from include.merge.safetensors_io import TensorSpec
from include.merge.writer import ShardedWriter

CACHE = Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy")) / "bench-models"
SIZES = {  # name -> (hidden, intermediate, layers, heads)
    "0p5b": (1024, 2816, 32, 16),
    "1p5b": (2048, 5632, 26, 16),
}
VOCAB = 32000
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shapes(hidden: int, inter: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (VOCAB, hidden)})
    return shapes


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, std: float) -> np.ndarray:
    if len(shape) == 1:
        return np.ones(shape, dtype=dtype)
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)


def make(name: str) -> tuple[Path, Path]:
    """The base and adapter dirs for size ``name`` (generated once)."""
    hidden, inter, layers, heads = SIZES[name]
    base, adapter = CACHE / f"llama-{name}-bf16", CACHE / f"llama-{name}-lora-r16"
    if (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        return base, adapter
    rng = np.random.default_rng(0)
    base.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(hidden, inter, layers)
    specs = [TensorSpec(k, "BF16", s) for k, s in shapes.items()]
    with ShardedWriter(base, specs, max_shard_bytes=2 * 1024**3, fsync=False) as writer:
        for spec in specs:
            writer.write(spec.name, _random(rng, spec.shape, np.dtype(ml_dtypes.bfloat16), 0.02))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "hidden_act": "silu", "dtype": "bfloat16",
    }
    (base / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    adapter.mkdir(parents=True, exist_ok=True)
    r = 16
    lora: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            lora[f"base_model.model.{module}.lora_A.weight"] = (r, shape[1])
            lora[f"base_model.model.{module}.lora_B.weight"] = (shape[0], r)
    lspecs = [TensorSpec(k, "F32", s) for k, s in sorted(lora.items())]
    with ShardedWriter(adapter, lspecs, max_shard_bytes=1 << 40, fsync=False) as writer:
        for spec in lspecs:
            writer.write(spec.name, _random(rng, spec.shape, np.dtype(np.float32), 0.02))
    (adapter / "model.safetensors").rename(adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": sorted(TARGETS), "bias": "none", "base_model_name_or_path": str(base),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }, indent=2) + "\n")
    return base, adapter


if __name__ == "__main__":
    for size in SIZES:
        print(make(size))
