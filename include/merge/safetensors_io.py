"""Safetensors without torch: read one tensor at a time (writing: :mod:`include.merge.writer`).

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and the raw
little-endian tensor bytes. Reading uses plain ``seek`` + ``readinto`` at a tensor's offset (no mmap,
so a read does not grow the process's RSS by the file size).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from include.errors import SafetensorsFormatError

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024

# Element sizes of the safetensors dtypes (bytes); sub-byte types are passed through by offsets only.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# The dtypes decoded to numpy arrays (everything else is copied as raw bytes only).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
}  # fmt: skip
# torch-style names as used in config.json and by users.
TORCH_NAMES: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SAFETENSORS_CODES: dict[str, str] = {v: k for k, v in TORCH_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, absolute byte offset and size, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return _nbytes(self.dtype, self.shape, self.name)


def _nbytes(dtype: str, shape: Sequence[int], name: str) -> int:
    if dtype not in DTYPE_SIZES:
        raise SafetensorsFormatError(
            f"tensor {name!r} has dtype {dtype!r}, which the writer cannot size",
            fix=f"use one of {sorted(DTYPE_SIZES)}",
        )
    return int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]


def numpy_dtype(code: str, *, name: str = "?") -> np.dtype:
    """The numpy dtype for a safetensors dtype code (F32, F16, BF16); others raise a clear error."""
    try:
        return NUMPY_DTYPES[code]
    except KeyError:
        raise SafetensorsFormatError(
            f"tensor {name!r} has dtype {code!r}, which cannot be decoded (only F32, F16 and BF16 can)",
            fix="use a base model stored in float32, float16 or bfloat16 (not a quantized checkpoint)",
        ) from None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors file's header: ``({name: TensorInfo}, metadata)``, tensors in file order."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise SafetensorsFormatError(f"{str(path)!r} is too short ({size} bytes) to be a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise SafetensorsFormatError(
                    f"{str(path)!r} announces a {length}-byte header in a {size}-byte file",
                    fix="the file is truncated or not safetensors; download or write it again",
                )
            raw = handle.read(length)
    except OSError as e:
        raise SafetensorsFormatError(f"cannot read {str(path)!r}: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsFormatError(f"{str(path)!r} has an invalid JSON header: {e}") from e
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{str(path)!r} header is {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise SafetensorsFormatError(f"{str(path)!r}: bad header entry for {name!r}: {entry!r}") from e
        if not 0 <= begin <= end or data_start + end > size:
            raise SafetensorsFormatError(
                f"{str(path)!r}: tensor {name!r} spans bytes {begin}..{end} beyond the file's "
                f"{size - data_start} data bytes",
                fix="the file is truncated; download or write it again",
            )
        if dtype in DTYPE_SIZES and _nbytes(dtype, shape, name) != end - begin:
            raise SafetensorsFormatError(
                f"{str(path)!r}: tensor {name!r} ({dtype}, shape {list(shape)}) has {end - begin} bytes, "
                f"expected {_nbytes(dtype, shape, name)}"
            )
        tensors.append(TensorInfo(name, dtype, shape, path, data_start + begin, end - begin))
    tensors.sort(key=lambda t: t.offset)
    return {t.name: t for t in tensors}, dict(metadata)


def iter_tensor_bytes(info: TensorInfo, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Yield a tensor's raw bytes (any dtype) as new uint8 arrays of at most ``chunk_bytes``, read at its offset."""
    chunk_bytes = max(1, chunk_bytes)
    with info.file.open("rb") as handle:
        handle.seek(info.offset)
        for start in range(0, info.nbytes, chunk_bytes):
            buffer = np.empty(min(chunk_bytes, info.nbytes - start), dtype=np.uint8)
            if handle.readinto(memoryview(buffer)) != buffer.size:
                raise SafetensorsFormatError(f"{str(info.file)!r}: file ends inside tensor {info.name!r}")
            yield buffer


def iter_tensor_chunks(info: TensorInfo, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """Yield a tensor (F32, F16, BF16) as flat numpy arrays of whole elements, about ``chunk_bytes`` each."""
    dtype = numpy_dtype(info.dtype, name=info.name)
    for raw in iter_tensor_bytes(info, max(1, chunk_bytes // dtype.itemsize) * dtype.itemsize):
        yield raw.view(dtype)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor (F32, F16 or BF16) into a new numpy array of its shape."""
    dtype = numpy_dtype(info.dtype, name=info.name)
    raw = next(iter_tensor_bytes(info, max(1, info.nbytes)), np.empty(0, dtype=np.uint8))
    return raw.view(dtype).reshape(info.shape)


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SafetensorsFormatError(
            f"{str(index)!r} is not a valid safetensors index ({type(e).__name__}: {e})",
            fix="download the model again; the index needs a 'weight_map' of tensor name -> file",
        ) from e
    if not isinstance(weight_map, dict):
        raise SafetensorsFormatError(f"{str(index)!r}: 'weight_map' is {type(weight_map).__name__}, not an object")
    return {str(k): str(v) for k, v in weight_map.items()}


def list_model_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a model dir (``model.safetensors`` or shards + index), in file/offset order."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_index(index)
        tensors: dict[str, TensorInfo] = {}
        for file in sorted(set(weight_map.values())):
            path = model_dir / file
            if not path.is_file():
                raise SafetensorsFormatError(
                    f"{str(index)!r} lists shard {file!r}, which is missing from {str(model_dir)!r}",
                    fix="download the model again (a shard is missing)",
                )
            found, _ = read_header(path)
            tensors.update({n: t for n, t in found.items() if weight_map.get(n) == file})
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise SafetensorsFormatError(
                f"{str(index)!r} maps {len(missing)} tensors to shards that lack them, e.g. {missing[0]!r}",
                fix="download the model again (index and shards disagree)",
            )
        return tensors
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return read_header(single)[0]
    raise SafetensorsFormatError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {str(model_dir)!r}",
        fix="point at a Hugging Face model dir saved with safetensors (save_pretrained(safe_serialization=True))",
    )
