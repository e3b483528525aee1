"""Tiny bases and adapters shared by the merge tests (built once per session), and peft as the oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.fixtures.tiny_model import make_base_model, make_lora_adapter

BASES = {  # name -> (arch, dtype)
    "llama32": ("llama", "float32"), "llama16": ("llama", "bfloat16"),
    "qwen32": ("qwen2", "float32"), "qwen16": ("qwen2", "bfloat16"),
    "mistral32": ("mistral", "float32"), "mistral16": ("mistral", "bfloat16"),
    "gemma32": ("gemma", "float32"),
}
ADAPTERS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (base, make_lora_adapter kwargs): one per semantic
    "r8_a16": ("llama32", {}),
    "r16_rslora": ("llama32", {"r": 16, "lora_alpha": 8, "use_rslora": True, "seed": 2}),
    "r4_qv_only": ("llama32", {"r": 4, "lora_alpha": 32, "target_modules": ("q_proj", "v_proj"), "seed": 3}),
    "patterns": ("llama32", {"rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 12},
                             "alpha_pattern": {"v_proj": 5, "model.layers.0.mlp.up_proj": 64}, "seed": 4}),
    "dora": ("llama32", {"use_dora": True, "seed": 5}),
    "modules_to_save": ("llama32", {"target_modules": ("q_proj", "v_proj"), "modules_to_save": ["lm_head"],
                                    "seed": 6}),
    "embedding": ("llama32", {"target_modules": ("embed_tokens", "q_proj", "down_proj"), "seed": 7}),
    "qwen2": ("qwen32", {"seed": 8}),
    "qwen2_lora_bias": ("qwen32", {"target_modules": ("q_proj", "k_proj", "v_proj"), "lora_bias": True, "seed": 9}),
    "qwen2_trained_bias": ("qwen32", {"bias": "all", "seed": 10}),
    "mistral": ("mistral32", {"seed": 11}),
    "gemma_tied_embedding": ("gemma32", {"target_modules": ("embed_tokens", "q_proj", "o_proj"), "seed": 12}),
}
_BUILT: dict[Path, dict[str, Path]] = {}
_ORACLE: dict[tuple[Path, Path, str], dict[str, torch.Tensor]] = {}


def build_models(root: Path) -> dict[str, Path]:
    """Every base and adapter under ``root`` (memoised, so several test modules share one build)."""
    if root not in _BUILT:
        out = {name: make_base_model(root / name, arch=arch, dtype=dtype)  # type: ignore[arg-type]
               for name, (arch, dtype) in BASES.items()}
        for name, (base, kwargs) in ADAPTERS.items():
            out[name] = make_lora_adapter(out[base], root / name, **kwargs)
        _BUILT[root] = out
    return _BUILT[root]


def peft_merged(base: Path, adapter: Path, precision: str = "native") -> dict[str, torch.Tensor]:
    """peft's merge_and_unload state dict (cached): ``native`` dtype, or everything in ``float64``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    key = (base, adapter, precision)
    if key not in _ORACLE:
        model = AutoModelForCausalLM.from_pretrained(base)
        peft_model = PeftModel.from_pretrained(model, adapter)
        if precision == "float64":
            peft_model = peft_model.double()
        merged = peft_model.merge_and_unload()
        _ORACLE[key] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return _ORACLE[key]
