"""Streaming LoRA merge: base safetensors + peft LoRA adapter -> merged safetensors, one tensor at a time.

No torch: tensors are read from the safetensors files with numpy (ml_dtypes for bfloat16) and written
straight to the output file block by block, so memory is about one block of rows whatever the model's
size. The math is peft's ``merge_and_unload`` (LoRA, rsLoRA, rank/alpha patterns, fan_in_fan_out, DoRA,
lora_bias, embedding LoRA, modules_to_save: see :mod:`include.merge.adapter`), computed in float64 and
rounded once (:mod:`include.merge.arithmetic`). Everything is validated before anything is written; the output
is built in a hidden sibling directory and renamed into ``out_dir`` only when complete
(:mod:`include.merge.staging`).

CLI (any backend): ``python -m include.merge --base DIR|ORG/NAME --adapter DIR --out DIR
[--backend streaming|peft|unsloth|auto] [--dtype auto|float32|float16|bfloat16] [--max-shard-size 2GiB]``
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from include.errors import MergeError, SafetensorsFormatError
from include.merge.adapter import TensorEdit, check_expected_base, inspect_adapter
from include.merge.arithmetic import blas_one_thread, check_edits, output_jobs
from include.merge.safetensors_io import (
    NUMPY_DTYPES,
    SAFETENSORS_CODES,
    TORCH_NAMES,
    TensorInfo,
    TensorSpec,
    list_model_tensors,
)
from include.merge.staging import Ahead, check_out_dir, copy_side_files, new_stage, publish
from include.merge.writer import ShardedWriter
from include.units import format_bytes

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
PROGRESS_SECONDS = 5.0
WORKERS = min(4, os.cpu_count() or 1)  # threads computing blocks (numpy releases the GIL)


def _base_tensors(base_dir: Path) -> dict[str, TensorInfo]:
    if not base_dir.is_dir():
        raise MergeError(
            f"base model dir {str(base_dir)!r} does not exist",
            fix="set base_model to a local model dir or a Hugging Face repo id available on this machine",
        )
    try:
        return list_model_tensors(base_dir)
    except SafetensorsFormatError as e:
        raise MergeError(
            f"base model dir {str(base_dir)!r} has no usable safetensors weights: {e.detail}",
            fix="set base_model to a local model dir or a Hugging Face repo id with safetensors weights "
            "(a *.bin-only model can be re-saved with save_pretrained(safe_serialization=True))",
        ) from e


def _output_code(dtype: str, info: TensorInfo) -> str:
    """The safetensors dtype of a tensor in the output: float tensors follow ``dtype``, others keep theirs."""
    if dtype == "auto" or info.dtype not in NUMPY_DTYPES:
        return info.dtype
    return SAFETENSORS_CODES[dtype]


def _tensor_jobs(base: dict[str, TensorInfo], specs: list[TensorSpec], edits: dict[str, TensorEdit]
                 ) -> Iterator[tuple[int, Callable[[], Any] | None]]:
    """The block jobs of every computed output tensor as ``(index, job)``, each tensor ended by ``(index, None)``.

    Untouched tensors (no edit, same dtype) get no jobs: the writer copies their bytes directly.
    """
    for index, spec in enumerate(specs):
        info, edit = base[spec.name], edits.get(spec.name)
        if _is_copy(info, edit, spec):
            continue
        for job in output_jobs(info, edit, spec.dtype):
            yield index, job
        yield index, None


def _is_copy(info: TensorInfo, edit: TensorEdit | None, spec: TensorSpec) -> bool:
    return edit is None and spec.dtype == info.dtype


def _dominant_dtype(specs: list[TensorSpec]) -> str:
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.dtype in TORCH_NAMES:
            sizes[spec.dtype] = sizes.get(spec.dtype, 0) + spec.nbytes
    return TORCH_NAMES[max(sizes, key=lambda c: sizes[c])] if sizes else "float32"


def merge_lora(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "auto",
    expected_base: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> dict[str, Any]:
    """Merge a peft LoRA adapter into a base model, tensor by tensor, into ``out_dir``.

    ``dtype``: ``"auto"`` keeps each tensor's dtype (as the base), else every float tensor is written
    as ``float32``/``float16``/``bfloat16``. ``expected_base``: the configured base model (repo id or
    path); when given, it must match the adapter's ``base_model_name_or_path`` (see
    :func:`include.merge.adapter.same_base`). ``out_dir`` must not exist or be empty. Everything is
    validated before the first write; on any error nothing is left in ``out_dir``.

    Returns ``{"tensors", "merged_tensors" (base tensors edited), "features", "backend", "bytes" (safetensors
    file bytes), "dtype", "files", "seconds"}``.
    """
    started = time.monotonic()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if dtype not in DTYPE_CHOICES:
        raise MergeError(f"unknown merge dtype {dtype!r}", fix=f"use one of {', '.join(DTYPE_CHOICES)}")
    if max_shard_bytes < 1:
        raise MergeError(f"max_shard_bytes must be positive, got {max_shard_bytes!r}", fix="use e.g. 2 GiB")
    adapter = inspect_adapter(adapter_dir)
    if expected_base is not None:
        check_expected_base(adapter.base_model_name_or_path, expected_base, adapter_dir)
    base = _base_tensors(base_dir)
    check_edits(adapter.edits, base, base_dir)
    check_out_dir(out_dir)

    edits = adapter.edits
    specs = [TensorSpec(name, _output_code(dtype, info), info.shape) for name, info in base.items()]
    out_dtype = dtype if dtype != "auto" else _dominant_dtype(specs)
    log.info(
        "merging %d tensors (%s; r=%d, scale=%g) from %s into %s (%d tensors, %s) -> %s as %s",
        len(edits), ", ".join(adapter.features), adapter.r, adapter.low_rank[0].scale, adapter_dir, base_dir,
        len(specs), format_bytes(sum(i.nbytes for i in base.values())), out_dir, out_dtype,
    )
    stage = new_stage(out_dir)
    try:
        ahead = Ahead(_tensor_jobs(base, specs, edits), workers=WORKERS, initializer=blas_one_thread)
        try:
            with ShardedWriter(stage, specs, max_shard_bytes=max_shard_bytes) as writer:
                last = time.monotonic()
                for done, spec in enumerate(specs, 1):
                    info = base[spec.name]
                    if _is_copy(info, edits.get(spec.name), spec):
                        writer.copy_tensor(spec.name, info)
                    else:
                        writer.write_bytes(spec.name, ahead.chunks(done - 1))
                    if time.monotonic() - last >= PROGRESS_SECONDS:
                        last = time.monotonic()
                        log.info("merge: %d/%d tensors, %s written, %.1f MB/s", done, len(specs),
                                 format_bytes(writer.bytes_written), writer.bytes_written / 1e6 / (last - started))
                weight_names = writer.close()
        finally:
            ahead.close()
        side_files = copy_side_files(base_dir, stage, out_dtype)
        file_bytes = sum((stage / name).stat().st_size for name in weight_names if name.endswith(".safetensors"))
        publish(stage, out_dir)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, SafetensorsFormatError):
            raise MergeError(f"merge failed: {e.detail}", fix=e.fix) from e
        raise
    seconds = time.monotonic() - started
    log.info("merged %d/%d tensors into %s: %s in %.1f s (%.1f MB/s)", len(edits), len(specs), out_dir,
             format_bytes(file_bytes), seconds, file_bytes / 1e6 / max(seconds, 1e-9))
    return {
        "tensors": len(specs),
        "merged_tensors": len(edits),
        "features": adapter.features,
        "backend": "streaming",
        "bytes": file_bytes,
        "dtype": out_dtype,
        "files": sorted(weight_names + side_files),
        "seconds": round(seconds, 3),
    }
