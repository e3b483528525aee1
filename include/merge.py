"""Streaming LoRA merge: base safetensors + peft LoRA adapter -> merged safetensors, one tensor at a time.

No torch: tensors are read from the safetensors files with numpy (ml_dtypes for bfloat16), so the
process holds about one tensor at a time. The math is peft's ``merge_and_unload`` for plain LoRA::

    delta = (B @ A) * scale          # float32; transposed when fan_in_fan_out
    W'    = cast(W + delta)          # W upcast to float32, result cast to the output dtype

with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). Everything is
validated before anything is written; the output is built in a hidden sibling directory and renamed
into ``out_dir`` only when complete.

CLI: ``python -m include.merge --base DIR --adapter DIR --out DIR [--dtype auto|float32|float16|bfloat16]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from include.errors import LoraDeployError, MergeError
from include.lora_adapter import LoraModule, check_expected_base, inspect_adapter
from include.safetensors_io import (
    CHUNK_BYTES,
    INDEX_FILE,
    NUMPY_DTYPES,
    SAFETENSORS_CODES,
    TORCH_NAMES,
    SafetensorsFormatError,
    ShardedWriter,
    TensorInfo,
    TensorSpec,
    iter_tensor_bytes,
    iter_tensor_chunks,
    list_model_tensors,
    read_tensor,
)

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
PROGRESS_SECONDS = 5.0
# Files of the base dir that are weights (never copied): other formats and the old index.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json")
# Smallest float32 magnitude that becomes Inf when cast (round to nearest even) to each output dtype.
CAST_BOUNDS = {"F32": np.inf, "BF16": float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32)), "F16": 65520.0}


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(
            f"output dir {str(out_dir)!r} already exists and is not empty",
            fix="choose a new output dir or delete the old one (the merge never overwrites)",
        )


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


def _check_shapes(modules: list[LoraModule], base: dict[str, TensorInfo], base_dir: Path) -> None:
    for m in modules:
        info = base.get(m.base_key)
        if info is None:
            raise MergeError(
                f"the adapter adapts module {m.module!r}, but the base {str(base_dir)!r} has no tensor {m.base_key!r}",
                fix="merge into the base model the adapter was trained on"
                + (" (LoRA on a tied lm_head is not supported yet)" if m.module.endswith("lm_head") else ""),
            )
        out_features, in_features = m.b.shape[0], m.a.shape[1]
        expected = (in_features, out_features) if m.fan_in_fan_out else (out_features, in_features)
        if info.shape != expected:
            raise MergeError(
                f"module {m.module!r}: the base weight has shape {list(info.shape)}, the adapter's "
                f"B @ A gives {list(expected)} (lora_A {list(m.a.shape)}, lora_B {list(m.b.shape)})",
                fix="merge into the base model the adapter was trained on (same architecture and size)",
            )
        if info.dtype not in NUMPY_DTYPES:
            raise MergeError(
                f"module {m.module!r}: base weight {m.base_key!r} is {info.dtype!r}; only F32/F16/BF16 can be merged",
                fix="use an unquantized base model (float32, float16 or bfloat16)",
            )


def _output_code(dtype: str, info: TensorInfo) -> str:
    """The safetensors dtype of a tensor in the output: float tensors follow ``dtype``, others keep theirs."""
    if dtype == "auto" or info.dtype not in NUMPY_DTYPES:
        return info.dtype
    return SAFETENSORS_CODES[dtype]


def _check_range(values: np.ndarray, out_code: str, name: str, where: str, *, merged: bool) -> None:
    """Raise MergeError when float32 ``values`` hold NaN/Inf (merged tensors) or overflow ``out_code``."""
    bound = CAST_BOUNDS[out_code]
    if values.min(initial=np.inf) > -bound and values.max(initial=-np.inf) < bound:  # NaN fails both
        return
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if merged and (nan or inf):
        raise MergeError(
            f"merged tensor {name!r} has {nan} NaN and {inf} Inf values ({where})",
            fix="the adapter has NaN/Inf or huge weights (diverged training?): check the training run",
        )
    big = int((np.abs(values[np.isfinite(values)]) >= bound).sum())
    if big:
        raise MergeError(
            f"{'merged ' if merged else ''}tensor {name!r} has {big} values beyond the {TORCH_NAMES[out_code]} "
            f"range ({where})",
            fix="merge to bfloat16 or float32 instead",
        )


def _output_chunks(info: TensorInfo, module: LoraModule | None, out_code: str) -> Iterator[np.ndarray]:
    """The output tensor as bytes in blocks of rows: ``W`` (+ ``(B @ A) * scale``), cast to ``out_code``.

    The delta is computed per block of rows (same per-element float32 math as one big matmul), so memory
    stays at a few chunks whatever the tensor's size. NaN/Inf in a merged tensor, or values that would
    overflow the output dtype, raise MergeError naming the tensor.
    """
    if module is None:  # a dtype cast only
        for chunk in iter_tensor_chunks(info):
            if NUMPY_DTYPES[out_code].itemsize < chunk.dtype.itemsize or out_code == "F16":
                _check_range(chunk.astype(np.float32, copy=False), out_code, info.name, "cast", merged=False)
            yield chunk.astype(NUMPY_DTYPES[out_code]).view(np.uint8)
        return
    cols = info.shape[-1]
    a = read_tensor(module.a).astype(np.float32)
    b = read_tensor(module.b).astype(np.float32)
    row_bytes = cols * NUMPY_DTYPES[info.dtype].itemsize
    row = 0
    for chunk in iter_tensor_chunks(info, chunk_bytes=max(1, CHUNK_BYTES // row_bytes) * row_bytes):
        weight = chunk.reshape(-1, cols)
        rows = slice(row, row + weight.shape[0])
        row = rows.stop
        delta = (b @ a[:, rows]).T if module.fan_in_fan_out else b[rows] @ a
        delta *= np.float32(module.scale)
        delta += weight  # float32 += W (upcast), as peft's in-place add
        _check_range(delta, out_code, info.name, f"rows {rows.start}..{rows.stop}", merged=True)
        yield np.ascontiguousarray(delta.astype(NUMPY_DTYPES[out_code], copy=False)).reshape(-1).view(np.uint8)


def _tensor_chunks(base: dict[str, TensorInfo], specs: list[TensorSpec], by_key: dict[str, LoraModule]
                   ) -> Iterator[tuple[int, Any]]:
    """Every output tensor's chunks in order as ``(index, chunk)``, each tensor ended by ``(index, None)``."""
    for index, spec in enumerate(specs):
        info, module = base[spec.name], by_key.get(spec.name)
        if module is None and spec.dtype == info.dtype:
            chunks: Iterator[Any] = iter_tensor_bytes(info)  # untouched: raw copy
        else:
            chunks = _output_chunks(info, module, spec.dtype)
        for chunk in chunks:
            yield index, chunk
        yield index, None


class _Ahead:
    """Run a generator in a worker thread up to ``depth`` items ahead (numpy and file I/O release the GIL,
    so computing the next chunks overlaps writing this one). Its exceptions re-raise in ``get``."""

    def __init__(self, items: Iterator[Any], depth: int = 4) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="merge-compute", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        """The next item (re-raising the producer's exception)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def chunks(self, index: int) -> Iterator[Any]:
        """The chunks of tensor ``index`` from a stream of ``(index, chunk)`` items ended by ``(index, None)``."""
        while True:
            got, chunk = self.get()
            if got != index:
                raise RuntimeError(f"merge pipeline out of step: tensor {got} while writing tensor {index}")
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        """Stop the worker and wait for it."""
        self._stop.set()
        self._thread.join()


def _copy_side_files(base_dir: Path, stage: Path, out_dtype: str) -> list[str]:
    """Copy the base's non-weight files (following symlinks) and set the dtype in config.json."""
    copied = []
    for src in sorted(base_dir.rglob("*")):
        rel = src.relative_to(base_dir)
        if any(part.startswith(".") for part in rel.parts) or not src.is_file():
            continue
        if src.name.endswith(WEIGHT_SUFFIXES) or src.name in WEIGHT_INDEXES:
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() == "config.json":
            config = json.loads(src.read_text())
            _set_dtype(config, out_dtype)
            dst.write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(src, dst)
        copied.append(rel.as_posix())
    return copied


def _set_dtype(config: dict[str, Any], dtype: str) -> None:
    """Set ``dtype`` / ``torch_dtype`` (whichever exist; both when neither does), also in sub-configs."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
    for key in keys:
        config[key] = dtype
    for value in config.values():  # nested sub-configs (text_config of multimodal models) that name a dtype
        if isinstance(value, dict) and ("torch_dtype" in value or "dtype" in value):
            _set_dtype(value, dtype)


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
    :func:`include.lora_adapter.same_base`). ``out_dir`` must not exist or be empty. Everything is
    validated before the first write; on any error nothing is left in ``out_dir``.

    Returns ``{"tensors", "merged_tensors", "bytes" (safetensors file bytes), "dtype", "files", "seconds"}``.
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
    _check_shapes(adapter.modules, base, base_dir)
    _check_out_dir(out_dir)

    by_key = {m.base_key: m for m in adapter.modules}
    specs = [TensorSpec(name, _output_code(dtype, info), info.shape) for name, info in base.items()]
    out_dtype = dtype if dtype != "auto" else _dominant_dtype(specs)
    log.info(
        "merging %d LoRA modules (r=%d, scale=%g) from %s into %s (%d tensors, %.1f MB) -> %s as %s",
        len(by_key), adapter.r, adapter.modules[0].scale if adapter.modules else 0.0, adapter_dir, base_dir,
        len(specs), sum(i.nbytes for i in base.values()) / 1e6, out_dir, out_dtype,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.parent / f".{out_dir.name}.merging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        ahead = _Ahead(_tensor_chunks(base, specs, by_key))
        try:
            with ShardedWriter(stage, specs, max_shard_bytes=max_shard_bytes) as writer:
                last = time.monotonic()
                for done, spec in enumerate(specs, 1):
                    writer.write_bytes(spec.name, ahead.chunks(done - 1))
                    if time.monotonic() - last >= PROGRESS_SECONDS:
                        last = time.monotonic()
                        mb = writer.bytes_written / 1e6
                        log.info("merge: %d/%d tensors, %.1f MB written, %.1f MB/s",
                                 done, len(specs), mb, mb / (last - started))
                weight_names = writer.close()
        finally:
            ahead.close()
        side_files = _copy_side_files(base_dir, stage, out_dtype)
        file_bytes = sum((stage / name).stat().st_size for name in weight_names if name.endswith(".safetensors"))
        os.chmod(stage, 0o755)
        try:
            os.replace(stage, out_dir)  # an empty out_dir is replaced atomically
        except OSError as e:
            raise MergeError(
                f"cannot move the merged model into {str(out_dir)!r}: {e}",
                fix="make sure the output dir is empty and on the same filesystem as its parent",
            ) from e
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, SafetensorsFormatError):
            raise MergeError(f"merge failed: {e.detail}", fix=e.fix) from e
        raise
    seconds = time.monotonic() - started
    log.info("merged %d/%d tensors into %s: %.1f MB in %.1f s (%.1f MB/s)", len(by_key), len(specs), out_dir,
             file_bytes / 1e6, seconds, file_bytes / 1e6 / max(seconds, 1e-9))
    return {
        "tensors": len(specs),
        "merged_tensors": len(by_key),
        "bytes": file_bytes,
        "dtype": out_dtype,
        "files": sorted(weight_names + side_files),
        "seconds": round(seconds, 3),
    }


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    try:
        return int(float(number) * units[stripped[len(number):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use bytes or e.g. 512MB, 2GiB") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the result record as JSON. Exit 2 on a merge error."""
    parser = argparse.ArgumentParser(prog="python -m include.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="base model dir (safetensors)")
    parser.add_argument("--adapter", required=True, type=Path, help="peft LoRA adapter dir")
    parser.add_argument("--out", required=True, type=Path, help="output dir (must not exist or be empty)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--expected-base", default=None, help="repo id or path the adapter must be trained on")
    parser.add_argument("--max-shard-size", default=2 * 1024**3, type=_size, help="e.g. 2GiB (default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = merge_lora(args.base, args.adapter, args.out, dtype=args.dtype,
                            expected_base=args.expected_base, max_shard_bytes=args.max_shard_size)
    except LoraDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
