"""Merge backends: ``streaming`` (default, exact, constant memory), ``peft`` (reference), ``unsloth`` (GPU), ``auto``.

- ``streaming``: :func:`include.merge.streaming.merge_lora`, numpy only, memory about one block of rows.
- ``peft``: loads the whole base model with transformers (RAM ~ model size), ``merge_and_unload``,
  a NaN/Inf check, ``save_pretrained``. Handles every adapter peft can merge.
- ``unsloth``: unsloth's ``save_pretrained_merged`` (``merged_16bit``). Needs CUDA and the ``gpu`` extra;
  without them it raises a MergeError saying why, before any write.
- ``auto``: ``streaming``; if the adapter uses a feature only peft can merge, ``peft``.

Every backend validates first (adapter type, expected base, output dir), writes into a staging dir and
renames it onto ``out_dir`` only when complete. torch/transformers/peft are imported inside functions.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from include.errors import MergeError, UnsupportedAdapterError
from include.merge.adapter import check_expected_base, inspect_adapter
from include.merge.staging import check_out_dir, copy_side_files, new_stage, publish
from include.merge.streaming import DTYPE_CHOICES, merge_lora
from include.units import format_bytes

log = logging.getLogger(__name__)

BACKENDS = ("streaming", "peft", "unsloth", "auto")


def cuda_status() -> str | None:
    """None when a CUDA GPU is usable, else the reason it is not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no NVIDIA GPU or driver on this machine)"
    return None


def choose_backend(backend: str, adapter_dir: Path) -> str:
    """The concrete backend for ``backend``: ``auto`` -> ``streaming`` unless the adapter needs ``peft``."""
    if backend not in BACKENDS:
        raise MergeError(f"unknown merge backend {backend!r}", fix=f"use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        inspect_adapter(adapter_dir)
    except UnsupportedAdapterError as e:
        log.info("auto backend: %s; merging with peft instead", e.detail)
        return "peft"
    return "streaming"


def merge_model(base_dir: Path, adapter_dir: Path, out_dir: Path, *, backend: str = "streaming",
                dtype: str = "auto", expected_base: str | None = None,
                max_shard_bytes: int = 2 * 1024**3) -> dict[str, Any]:
    """Merge ``adapter_dir`` into ``base_dir`` with ``backend``; returns a :func:`~include.merge.streaming.merge_lora`
    record."""
    chosen = choose_backend(backend, Path(adapter_dir))
    if chosen == "streaming":
        return merge_lora(base_dir, adapter_dir, out_dir, dtype=dtype, expected_base=expected_base,
                          max_shard_bytes=max_shard_bytes)
    if chosen == "unsloth":
        reason = cuda_status()
        if reason is not None:
            raise MergeError(f"the unsloth merge backend needs a CUDA GPU, but {reason}",
                             fix="use merge.backend: streaming (exact, any size, no GPU) or auto")
    return _merge_with_torch(chosen, Path(base_dir), Path(adapter_dir), Path(out_dir), dtype=dtype,
                             expected_base=expected_base, max_shard_bytes=max_shard_bytes)


def _peft_type(adapter_dir: Path) -> str:
    import json

    try:
        return str(json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type"))
    except (OSError, ValueError) as e:
        raise MergeError(f"cannot read {str(adapter_dir / 'adapter_config.json')!r}: {e}",
                         fix="point the source at a peft checkpoint dir saved with save_pretrained") from e


def _merge_with_torch(backend: str, base_dir: Path, adapter_dir: Path, out_dir: Path, *, dtype: str,
                      expected_base: str | None, max_shard_bytes: int) -> dict[str, Any]:
    """The peft / unsloth backends: whole model in memory, validated first, staged, published atomically."""
    started = time.monotonic()
    if dtype not in DTYPE_CHOICES:
        raise MergeError(f"unknown merge dtype {dtype!r}", fix=f"use one of {', '.join(DTYPE_CHOICES)}")
    peft_type = _peft_type(adapter_dir)
    if peft_type.upper() != "LORA":
        raise MergeError(f"adapter {str(adapter_dir)!r} has peft_type {peft_type!r}; only LORA adapters are "
                         "supported", fix="train a LoRA adapter (peft LoraConfig)")
    if expected_base is not None:
        import json

        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        check_expected_base(recorded, expected_base, adapter_dir)
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"base model dir {str(base_dir)!r} has no config.json",
                         fix="set base_model to a local model dir or a Hugging Face repo id in the local cache")
    check_out_dir(out_dir)
    stage = new_stage(out_dir)
    try:
        model, out_dtype = (_unsloth_merged if backend == "unsloth" else _peft_merged)(base_dir, adapter_dir, dtype)
        model.save_pretrained(stage, safe_serialization=True, max_shard_size=max_shard_bytes)
        for name in ("config.json", "generation_config.json"):
            (stage / name).unlink(missing_ok=True)  # the base's own files (dtype set) are copied below
        side_files = copy_side_files(base_dir, stage, out_dtype)
        weights = sorted(p.name for p in stage.iterdir() if p.name.startswith("model") and p.is_file())
        file_bytes = sum((stage / n).stat().st_size for n in weights if n.endswith(".safetensors"))
        publish(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info("%s merge into %s: %s in %.1f s", backend, out_dir, format_bytes(file_bytes), seconds)
    return {"tensors": None, "merged_tensors": None, "features": [], "backend": backend, "bytes": file_bytes,
            "dtype": out_dtype, "files": sorted(weights + side_files), "seconds": round(seconds, 3)}


def _torch_dtype(base_dir: Path, dtype: str) -> tuple[Any, str]:
    import json

    import torch

    if dtype == "auto":
        config = json.loads((base_dir / "config.json").read_text())
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return getattr(torch, dtype), dtype


def _peft_merged(base_dir: Path, adapter_dir: Path, dtype: str) -> tuple[Any, str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype, name = _torch_dtype(base_dir, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    # Not safe_merge=True: that path rounds the delta to the weight dtype before adding (a second rounding
    # in bf16/fp16); the default in-place merge adds the float32 delta. Finiteness is checked after.
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    _check_finite(merged)
    return merged.to(torch_dtype), name


def _check_finite(model: Any) -> None:
    import torch

    for name, param in model.state_dict().items():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise MergeError(f"merged tensor {name!r} has NaN or Inf values",
                             fix="the adapter has NaN/Inf or huge weights (diverged training?): check the training run")


def _unsloth_merged(base_dir: Path, adapter_dir: Path, dtype: str) -> tuple[Any, str]:  # pragma: no cover - GPU
    try:
        from unsloth import FastLanguageModel
    except ImportError as e:
        raise MergeError("the unsloth merge backend needs the unsloth package",
                         fix="install the gpu extra: pip install 'lora-deploy[gpu]'") from e
    torch_dtype, name = _torch_dtype(base_dir, dtype)
    model, _ = FastLanguageModel.from_pretrained(str(base_dir), dtype=torch_dtype, load_in_4bit=False)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    _check_finite(merged)
    return merged.to(torch_dtype), name
