"""The merge arithmetic, one block of rows at a time, in float64 with one final rounding (numpy, no torch).

For a weight ``W`` with a LoRA edit (see :mod:`include.merge.adapter`)::

    D  = scale * (B @ A)          # transposed for fan_in_fan_out and embedding LoRA
    W' = W + D                    # DoRA: W' = (W + D) * magnitude / ||W + D|| per output feature
    out = cast(float32(W'))       # the output dtype, rounded to nearest even (via float32, as torch casts)

Everything before the final cast is float64: every product of two float32 numbers is exact there and the
sum of ``r`` of them carries ~29 more bits than float32, so the result is the correctly rounded value
(to float32) of the exact merge, whatever BLAS (and its summation order) numpy uses. peft computes the
same formula in float32 (``W`` upcast), so the two differ only by peft's own float32 rounding: at most
an ulp or two of float32, which can cross a 16-bit rounding boundary in rare elements.

Memory: a few blocks of rows of ``BLOCK_BYTES`` (as float64) in flight, plus A and B.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from include.errors import MergeError
from include.merge.adapter import LowRank, TensorEdit
from include.merge.safetensors_io import (
    CHUNK_BYTES,
    NUMPY_DTYPES,
    TORCH_NAMES,
    TensorInfo,
    read_tensor,
)

# Smallest float32 magnitude that becomes Inf when cast (round to nearest even) to each output dtype.
CAST_BOUNDS = {"F32": np.inf, "BF16": float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32)), "F16": 65520.0}
BLOCK_BYTES = CHUNK_BYTES // 2  # float64 bytes per block of rows (tests lower it to force many blocks)
SUB_BLOCK_BYTES = 512 * 1024  # float64 bytes of W + D computed at once (fits the L2 cache)


@functools.cache
def _openblas_local() -> Callable[[int], int] | None:
    """numpy's bundled OpenBLAS ``openblas_set_num_threads_local`` (per calling thread), if there is one."""
    import ctypes

    libs = Path(np.__file__).parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*.so*")) if libs.is_dir() else []:
        try:
            function = ctypes.CDLL(str(path)).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function  # type: ignore[no-any-return]
    return None


def blas_one_thread() -> None:
    """Make BLAS single-threaded in the calling thread (a worker initializer).

    Blocks already run in parallel on their own threads; OpenBLAS's own threads on top of them (r-wide
    products are tiny) made the merge about 2x slower on a 2-core machine. A no-op without OpenBLAS.
    """
    function = _openblas_local()
    if function is not None:
        function(1)


def check_edits(edits: dict[str, TensorEdit], base: dict[str, TensorInfo], base_dir: Path) -> None:
    """Raise MergeError unless every edited tensor exists in the base with shapes and dtypes that fit."""
    for key, edit in sorted(edits.items()):
        info = base.get(key)
        module = key.rsplit(".", 1)[0]
        if info is None and edit.add is not None:
            raise MergeError(f"the adapter has lora_bias on {module!r}, whose base layer has no bias",
                             fix="peft cannot merge this either; retrain with lora_bias=False")
        if info is None:
            tied = module.endswith("lm_head") and "model.embed_tokens.weight" in base
            raise MergeError(
                f"the adapter changes {key!r} (module {module!r}), but the base {str(base_dir)!r} has no such tensor"
                + (" (its lm_head is tied to the input embeddings)" if tied else ""),
                fix="merge into the base model the adapter was trained on"
                + ("; LoRA or modules_to_save on a tied lm_head is not supported: target embed_tokens instead"
                   if tied else ""),
            )
        if info.dtype not in NUMPY_DTYPES:
            raise MergeError(
                f"base tensor {key!r} is {info.dtype!r}; only F32/F16/BF16 can be merged",
                fix="use an unquantized base model (float32, float16 or bfloat16)",
            )
        if edit.replacement is not None and edit.replacement.shape != info.shape:
            raise MergeError(
                f"the adapter replaces {key!r} with shape {list(edit.replacement.shape)}, the base has "
                f"{list(info.shape)} (resized vocabulary?)",
                fix="merge into the base model the adapter was trained on, resized the same way",
            )
        if edit.low_rank is not None:
            _check_low_rank(edit.low_rank, info)
        if edit.add is not None and edit.add.shape != info.shape:
            raise MergeError(f"lora_B bias of {module!r} has shape {list(edit.add.shape)}, the base bias "
                             f"{list(info.shape)}", fix="merge into the base model the adapter was trained on")


def _check_low_rank(lr: LowRank, info: TensorInfo) -> None:
    if info.shape != lr.out_shape:
        raise MergeError(
            f"module {lr.module!r}: the base weight has shape {list(info.shape)}, the adapter's "
            f"B @ A gives {list(lr.out_shape)} (A {list(lr.a.shape)}, B {list(lr.b.shape)})",
            fix="merge into the base model the adapter was trained on (same architecture and size)",
        )
    if lr.magnitude is not None:
        if lr.embedding:
            raise MergeError(f"module {lr.module!r}: DoRA on an embedding is not supported by the streaming merge",
                             fix="merge this adapter with the peft backend (merge.backend: peft)")
        if lr.magnitude.shape != (lr.b.shape[0],):
            raise MergeError(f"module {lr.module!r}: DoRA magnitude has shape {list(lr.magnitude.shape)}, "
                             f"expected [{lr.b.shape[0]}]", fix="download the adapter again")


def check_range(values: np.ndarray, out_code: str, name: str, where: str, *, merged: bool) -> None:
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


def _f64(info: TensorInfo) -> np.ndarray:
    return read_tensor(info).astype(np.float64)


def _row_slices(source: TensorInfo) -> list[slice]:
    """Blocks of whole rows of about ``BLOCK_BYTES`` as float64 (a 1-D tensor is one row)."""
    if source.nbytes == 0:
        return []
    rows = math.prod(source.shape[:-1]) if len(source.shape) > 1 else 1  # N-D: all leading dims are rows
    cols = source.shape[-1] if source.shape else 1
    step = max(1, BLOCK_BYTES // (8 * max(cols, 1)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


_LOCAL = threading.local()


def _buffer(key: str, dtype: np.dtype | type, shape: tuple[int, int]) -> np.ndarray:
    """A scratch array of this thread, reused across blocks (no allocation churn: RSS stays flat)."""
    count = shape[0] * shape[1]
    buffer = getattr(_LOCAL, key, None)
    if buffer is None or buffer.size < count:
        buffer = np.empty(count, dtype=dtype)
        setattr(_LOCAL, key, buffer)
    return buffer[:count].reshape(shape)


def _read_rows(source: TensorInfo, rows: slice) -> np.ndarray:
    """Rows of a tensor as float32 (exact for F32/F16/BF16), read at their offset (no mmap), in a scratch array."""
    cols = source.shape[-1] if source.shape else 1
    dtype = NUMPY_DTYPES[source.dtype]
    shape = (rows.stop - rows.start, cols)
    raw = _buffer("raw", np.uint8, (1, shape[0] * cols * dtype.itemsize))[0]
    with source.file.open("rb", buffering=0) as handle:
        handle.seek(source.offset + rows.start * cols * dtype.itemsize)
        if handle.readinto(memoryview(raw)) != raw.size:
            raise MergeError(f"{str(source.file)!r} ends inside tensor {source.name!r}",
                             fix="the file is truncated; download the model again")
    if dtype == np.float32:
        return raw.view(np.float32).reshape(shape)
    weight = _buffer("w32", np.float32, shape)
    np.copyto(weight, raw.view(dtype).reshape(shape))
    return weight


class _Merger:
    """One edited tensor: replacement, + low-rank delta (DoRA-rescaled), + bias add, by blocks of rows.

    Built once per tensor (A and B in float64, ``scale`` folded into A; for fan_in_fan_out DoRA a first
    pass computes the column norms); :meth:`output` is then thread-safe, so blocks compute in parallel.
    Inside a block the float64 math runs on sub-blocks of ``SUB_BLOCK_BYTES`` that stay in the CPU cache.
    """

    def __init__(self, info: TensorInfo, edit: TensorEdit) -> None:
        self.info, self.source = info, edit.replacement or info
        lr = self.lr = edit.low_rank
        if lr is not None:
            self.a, self.b = _f64(lr.a) * lr.scale, _f64(lr.b)
        self.magnitude = _f64(lr.magnitude) if lr is not None and lr.magnitude is not None else None
        self.add = _f64(edit.add).reshape(1, -1) * edit.add_scale if edit.add is not None else None
        self.column_factor = None
        if self.magnitude is not None and lr is not None and lr.transpose:
            sums = np.zeros(self.source.shape[-1], dtype=np.float64)
            for rows in _row_slices(self.source):
                for _, _, block in self._sub_blocks(rows, _read_rows(self.source, rows)):
                    sums += np.einsum("ij,ij->j", block, block)
            self.column_factor = self.magnitude / np.sqrt(sums)

    def _scratch_blocks(self, rows: slice, weight: np.ndarray) -> Iterator[tuple[slice, slice, np.ndarray]]:
        """``(local rows, stored rows, float64 scratch)`` for cache-sized sub-blocks of ``rows``."""
        count, cols = weight.shape
        step = max(1, SUB_BLOCK_BYTES // (8 * cols))
        scratch = _buffer("f64", np.float64, (min(step, count), cols))
        for start in range(0, count, step):
            stop = min(start + step, count)
            yield slice(start, stop), slice(rows.start + start, rows.start + stop), scratch[: stop - start]

    def _low_rank_into(self, lr: LowRank, stored: slice, out: np.ndarray) -> None:
        """``out = D`` for the stored rows (fan_in_fan_out / embedding: stored (in, out), rows index A's columns)."""
        if lr.transpose:
            np.matmul(self.a[:, stored].T, self.b.T, out=out)
        else:
            np.matmul(self.b[stored], self.a, out=out)

    def _sub_blocks(self, rows: slice, weight: np.ndarray) -> Iterator[tuple[slice, slice, np.ndarray]]:
        """``(local rows, stored rows, W + D)`` for cache-sized sub-blocks of ``rows`` (float64 scratch)."""
        for local, stored, block in self._scratch_blocks(rows, weight):
            if self.lr is None:
                np.copyto(block, weight[local])
            else:
                self._low_rank_into(self.lr, stored, block)
                block += weight[local]
            yield local, stored, block

    def output(self, rows: slice, out_code: str) -> np.ndarray:
        """These rows merged, rounded once to float32, range-checked, cast to ``out_code``, as bytes."""
        weight = _read_rows(self.source, rows)
        values = _buffer("f32", np.float32, weight.shape)
        if self.lr is not None and self.magnitude is None and self.add is None:
            self._plain(self.lr, rows, weight, values)
        else:
            self._general(rows, weight, values)
        check_range(values, out_code, self.info.name, f"rows {rows.start}..{rows.stop}", merged=True)
        return values.astype(NUMPY_DTYPES[out_code]).reshape(-1).view(np.uint8)  # a new array (the job's result)

    def _plain(self, lr: LowRank, rows: slice, weight: np.ndarray, values: np.ndarray) -> None:
        """Plain LoRA: ``values = float32(D + W)``, the float64 add and the one rounding fused in one pass."""
        for local, stored, delta in self._scratch_blocks(rows, weight):
            self._low_rank_into(lr, stored, delta)
            np.add(delta, weight[local], out=values[local], casting="same_kind")

    def _general(self, rows: slice, weight: np.ndarray, values: np.ndarray) -> None:
        """Replacement-only, DoRA and bias edits: W + D in float64, rescaled / shifted, then rounded once."""
        for local, stored, block in self._sub_blocks(rows, weight):
            if self.column_factor is not None:
                block *= self.column_factor
            elif self.magnitude is not None:
                block *= (self.magnitude[stored] / np.sqrt(np.einsum("ij,ij->i", block, block)))[:, None]
            if self.add is not None:
                block += self.add
            np.copyto(values[local], block, casting="same_kind")  # the one rounding (to nearest even)


def _cast(info: TensorInfo, rows: slice, out_code: str) -> np.ndarray:
    values = _read_rows(info, rows)
    out_dtype = NUMPY_DTYPES[out_code]
    if out_dtype.itemsize < NUMPY_DTYPES[info.dtype].itemsize or out_code == "F16":
        check_range(values, out_code, info.name, "cast", merged=False)
    return values.astype(out_dtype).reshape(-1).view(np.uint8)


def output_jobs(info: TensorInfo, edit: TensorEdit | None, out_code: str) -> Iterator[Callable[[], np.ndarray]]:
    """The output tensor as jobs, one per block of rows, each returning that block's bytes in ``out_code``.

    Unedited tensors are only cast (float32 in between, exact); edited ones are merged in float64 and
    rounded once to float32, then to ``out_code``. NaN/Inf in a merged tensor, or values that would
    overflow the output dtype, raise MergeError naming the tensor (from the job). Jobs are independent:
    they may run in parallel; per-tensor setup runs when the iterator is first advanced.
    """
    if edit is None:
        for rows in _row_slices(info):
            yield functools.partial(_cast, info, rows, out_code)
        return
    merger = _Merger(info, edit)
    for rows in _row_slices(merger.source):
        yield functools.partial(merger.output, rows, out_code)
