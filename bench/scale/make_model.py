"""Generate a real-shaped model with random bf16 weights (numpy, no torch): the memory benchmarks' subject.

    .venv/bin/python bench/scale/make_model.py OUT_DIR [--shape qwen2.5-1.5b|qwen2.5-7b] [--layers N]

Writes ``config.json`` (Qwen2ForCausalLM), safetensors shards + index (2 GB shards, tensors written in row
chunks so this process stays small), ``generation_config.json`` and the tiny test model's SentencePiece
tokenizer (1000 pieces: every token id it produces is < the model's vocabulary, which the converter pads
with ``[PADn]`` tokens; the fidelity gate feeds token ids, so only tokenization differs from the real model).
Weights: normal(0, 0.02), norms 1, q/k/v biases normal(0, 0.02); the logits are near-flat, which is fine for
measuring memory, not for judging quality thresholds. Delete the directory when done (~3 GB for 1.5B).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from include.merge.safetensors_io import TensorSpec  # noqa: E402
from include.merge.writer import ShardedWriter  # noqa: E402

# name -> hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings (the published configs)
SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": (5120, 13824, 48, 40, 8, 152064, False),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256, False),  # for stage_memory.py --predict (140 GB: not generated)
}
CHUNK_ROWS = 4096
BF16 = np.dtype(ml_dtypes.bfloat16)


def tensor_shapes(shape: str, layers: int | None = None, bias: bool = True) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a Qwen2 checkpoint of ``shape`` (``layers`` overrides the depth; ``bias=False``
    drops the q/k/v biases, as a Llama checkpoint of the same dimensions has none)."""
    hidden, inter, depth, heads, kv_heads, vocab, tied = SHAPES[shape]
    kv = hidden // heads * kv_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers or depth):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            **({p + "self_attn.q_proj.bias": (hidden,), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,)} if bias else {}),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    out["model.norm.weight"] = (hidden,)
    if not tied:
        out["lm_head.weight"] = (vocab, hidden)
    return out


def _chunks(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    if name.endswith("norm.weight"):
        yield np.ones(shape, dtype=BF16).view(np.uint8)
        return
    rows, cols = (1, shape[0]) if len(shape) == 1 else shape
    for start in range(0, rows, CHUNK_ROWS):
        count = min(CHUNK_ROWS, rows - start)
        yield (rng.standard_normal((count, cols), dtype=np.float32) * 0.02).astype(BF16).reshape(-1).view(np.uint8)


def tokenizer_source() -> Path:
    """The tiny test model's tokenizer files (generated once under the bench cache)."""
    from tests.fixtures.tiny_model import make_base_model

    cache = Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy")) / "bench" / "gguf-tiny"
    if not (cache / "config.json").is_file():
        make_base_model(cache)
    return cache


def make_model(out: Path, shape: str = "qwen2.5-1.5b", layers: int | None = None, seed: int = 0,
               arch: str = "qwen2") -> Path:
    """Write the model to ``out`` (replaced if present); returns ``out``.

    ``arch="llama"`` writes the same dimensions as a LlamaForCausalLM (no q/k/v biases): the tiny SentencePiece
    tokenizer then takes the converter's SentencePiece route exactly as a Llama/Mistral model's does, so the
    deploy DAG's token comparison passes (with ``qwen2`` the converter's Qwen2 vocab handling tokenizes that
    tokenizer differently from transformers, which a real Qwen2 model, shipped with its BPE tokenizer, never meets).
    """
    hidden, inter, depth, heads, kv_heads, vocab, tied = SHAPES[shape]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(shape, layers, bias=arch == "qwen2")
    specs = [TensorSpec(name, "BF16", dims) for name, dims in shapes.items()]
    with ShardedWriter(tmp, specs, max_shard_bytes=2 * 1024**3, fsync=False) as writer:
        for spec in specs:
            writer.write_bytes(spec.name, _chunks(rng, spec.name, spec.shape))
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], "model_type": arch,
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers or depth, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": tied, "use_sliding_window": False,
        "sliding_window": 32768, "max_window_layers": layers or depth, "bos_token_id": 1, "eos_token_id": 2,
        "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "bfloat16", "use_cache": True,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    source = tokenizer_source()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    """Command line: generate one model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    args = parser.parse_args()
    print(make_model(args.out, args.shape, args.layers, arch=args.arch))


if __name__ == "__main__":
    main()
