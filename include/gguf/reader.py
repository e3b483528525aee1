"""A small GGUF header reader (standard library only): what a GGUF file holds without reading its tensors.

It parses the header (magic, version, key/value metadata, tensor infos) through ``mmap`` so only the
header pages are touched, then checks that every tensor's data lies inside the file. It does not use the
PyPI ``gguf`` package (whose versions drift from the pinned converter) nor the vendored gguf-py.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from include.errors import GGUFError
from include.store.hashing import sha256_file

GGUF_MAGIC = b"GGUF"
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
DEFAULT_ALIGNMENT = 32
QK_K = 256

# ggml type id -> (name, elements per block, bytes per block); from ggml.h / gguf-py constants.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 2 + 16),
    3: ("Q4_1", 32, 2 + 2 + 16),
    6: ("Q5_0", 32, 2 + 4 + 16),
    7: ("Q5_1", 32, 2 + 2 + 4 + 16),
    8: ("Q8_0", 32, 2 + 32),
    9: ("Q8_1", 32, 2 + 2 + 32),
    10: ("Q2_K", 256, 2 + 2 + QK_K // 16 + QK_K // 4),
    11: ("Q3_K", 256, 2 + QK_K // 4 + QK_K // 8 + 12),
    12: ("Q4_K", 256, 2 + 2 + QK_K // 2 + 12),
    13: ("Q5_K", 256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    14: ("Q6_K", 256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    15: ("Q8_K", 256, 4 + QK_K + QK_K // 8),
    16: ("IQ2_XXS", 256, 2 + QK_K // 4),
    17: ("IQ2_XS", 256, 2 + QK_K // 4 + QK_K // 32),
    18: ("IQ3_XXS", 256, 2 + QK_K // 4 + QK_K // 8),
    19: ("IQ1_S", 256, 2 + QK_K // 8 + QK_K // 16),
    20: ("IQ4_NL", 32, 2 + 16),
    21: ("IQ3_S", 256, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    22: ("IQ2_S", 256, 2 + QK_K // 4 + QK_K // 16),
    23: ("IQ4_XS", 256, 2 + 2 + QK_K // 2 + QK_K // 64),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, QK_K // 8 + QK_K // 16 + QK_K // 32),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 2 + 4 * 13),
    35: ("TQ2_0", 256, 2 + 64),
    39: ("MXFP4", 32, 1 + 16),
    40: ("NVFP4", 64, 4 + 32),
    41: ("Q1_0", 128, 2 + 16),
    42: ("Q2_0", 64, 2 + 16),
}

# GGUF metadata value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_RECORD_STRING = 256  # longer metadata strings are elided from as_record()
_MAX_SMALL_ARRAY = 64  # arrays longer than this (token lists, scores) are summarised, not kept


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: name, dims (ggml order, fastest first), ggml type, data offset and size."""

    name: str
    dims: tuple[int, ...]
    ggml_type: str
    offset: int
    nbytes: int | None  # None for a ggml type this reader does not know

    @property
    def elements(self) -> int:
        """Number of weights in the tensor."""
        count = 1
        for dim in self.dims:
            count *= dim
        return count


@dataclass(frozen=True)
class GGUFSummary:
    """What a GGUF file holds, as small JSON-able facts (``as_record()``)."""

    path: str
    bytes: int
    sha256: str
    version: int
    tensor_count: int
    architecture: str | None
    weights_by_type: dict[str, int]  # ggml type name -> number of weights in tensors of that type
    bits_per_weight: float  # file tensor-data bytes * 8 / total weights
    matrix_weights_by_type: dict[str, int] = field(default_factory=dict)  # same, 2-D+ tensors only
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar and short-array KVs (no vocab)
    tensors: tuple[TensorInfo, ...] = field(default=(), repr=False, compare=False)
    shards: tuple[dict[str, Any], ...] = ()  # split GGUF: {"path", "bytes", "sha256"} per shard (path = first)

    @property
    def file_type(self) -> int | None:
        """``general.file_type`` (the llama_ftype the file was written as), if present."""
        value = self.metadata.get("general.file_type")
        return int(value) if isinstance(value, int) else None

    def fractions(self, *, matrices_only: bool = True) -> dict[str, float]:
        """Share of weights per ggml type (of 2-D tensors by default), rounded to 4 digits."""
        counts = self.matrix_weights_by_type if matrices_only else self.weights_by_type
        total = sum(counts.values()) or 1
        return {name: round(count / total, 4) for name, count in sorted(counts.items())}

    def as_record(self) -> dict[str, Any]:
        """Small JSON-able dict of the summary: no per-tensor list, long strings (chat templates) elided."""
        record = asdict(self)
        record.pop("tensors")
        record["shards"] = [dict(shard) for shard in self.shards]
        record["metadata"] = {
            key: f"<{len(value)} chars>" if isinstance(value, str) and len(value) > _MAX_RECORD_STRING else value
            for key, value in self.metadata.items()
        }
        return record


class _Cursor:
    """Sequential little-endian reader over a buffer that turns overruns into GGUFError."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _truncated(self.path, f"header ends at byte {len(self.buf)} inside a value at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.pos + length > len(self.buf):
            raise _truncated(self.path, f"string of {length} bytes at byte {self.pos} runs past the end")
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.take("<I")
            count = self.take("<Q")
            if count > _MAX_SMALL_ARRAY:
                self.skip_array(etype, count)
                return {"array_of": etype, "length": count}
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"{str(self.path)!r}: unknown GGUF value type {vtype} at byte {self.pos}",
                        fix="the file is corrupt or from a newer GGUF version; re-create it with the pinned converter")

    def skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[etype]) * count
            if self.pos > len(self.buf):
                raise _truncated(self.path, "an array runs past the end of the file")
        else:
            for _ in range(count):
                self.value(etype)


def _truncated(path: Path, what: str) -> GGUFError:
    return GGUFError(f"{str(path)!r} is truncated or corrupt: {what}",
                     fix="re-create or re-download the file; do not use a partially written GGUF")


def _tensor_nbytes(type_id: int, dims: tuple[int, ...], name: str, path: Path) -> int | None:
    known = GGML_TYPES.get(type_id)
    if known is None:
        return None
    type_name, block, block_bytes = known
    elements = 1
    for dim in dims:
        elements *= dim
    if dims and dims[0] % block:
        raise GGUFError(f"{str(path)!r}: tensor {name!r} of type {type_name} has a row of {dims[0]} weights, "
                        f"not a multiple of its block size {block}", fix="the file is corrupt; re-create it")
    return elements // block * block_bytes


def inspect_gguf(path: Path, *, with_sha256: bool = True) -> GGUFSummary:
    """Read a GGUF file's header and summarise it; GGUFError if it is not a GGUF or is truncated.

    Only the header is parsed (through mmap); tensor data is never read, except by the sha256 of the
    whole file (``with_sha256=False`` skips it and leaves ``sha256`` empty).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        handle = path.open("rb")
    except OSError as e:
        raise GGUFError(f"cannot open GGUF {str(path)!r}: {e}", fix="check the path and its permissions") from e
    with handle:
        if size < 24:
            raise GGUFError(f"{str(path)!r} is not a GGUF file: only {size} bytes",
                            fix="point at a .gguf produced by convert_hf_to_gguf.py or the quantizer")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            summary = _parse(buf, path, size)
    if with_sha256:
        summary = GGUFSummary(**{**summary.__dict__, "sha256": sha256_file(path)})
    return summary


def _parse(buf: Any, path: Path, size: int) -> GGUFSummary:
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{str(path)!r} is not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}",
                        fix="point at a .gguf produced by convert_hf_to_gguf.py or the quantizer")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{str(path)!r}: unsupported GGUF version {version}",
                        fix="re-create it with the pinned converter")
    tensor_count = cur.take("<Q")
    kv_count = cur.take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    tensors: list[TensorInfo] = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = tuple(cur.take("<Q") for _ in range(n_dims))
        type_id = cur.take("<I")
        offset = cur.take("<Q")
        type_name = GGML_TYPES.get(type_id, (f"TYPE_{type_id}", 0, 0))[0]
        tensors.append(TensorInfo(name, dims, type_name, offset, _tensor_nbytes(type_id, dims, name, path)))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = DEFAULT_ALIGNMENT
    data_start = -(-cur.pos // alignment) * alignment
    data_bytes = size - data_start
    for tensor in tensors:
        end = tensor.offset + (tensor.nbytes or 0)
        if end > data_bytes:
            raise _truncated(path, f"tensor {tensor.name!r} ends at byte {data_start + end}, file has {size}")
    by_type: dict[str, int] = {}
    matrix_by_type: dict[str, int] = {}
    for tensor in tensors:
        by_type[tensor.ggml_type] = by_type.get(tensor.ggml_type, 0) + tensor.elements
        if sum(1 for dim in tensor.dims if dim > 1) >= 2:
            matrix_by_type[tensor.ggml_type] = matrix_by_type.get(tensor.ggml_type, 0) + tensor.elements
    total = sum(by_type.values())
    arch = metadata.get("general.architecture")
    return GGUFSummary(
        path=str(path),
        bytes=size,
        sha256="",
        version=version,
        tensor_count=tensor_count,
        architecture=arch if isinstance(arch, str) else None,
        weights_by_type=dict(sorted(by_type.items())),
        bits_per_weight=round(max(data_bytes, 0) * 8 / total, 4) if total else 0.0,
        matrix_weights_by_type=dict(sorted(matrix_by_type.items())),
        metadata=metadata,
        tensors=tuple(tensors),
    )


def split_shards(first: Path) -> list[Path]:
    """The shard files of a split GGUF (``NAME-00001-of-0000N.gguf``) starting at ``first``; [first] if not split."""
    first = Path(first)
    match = SPLIT_NAME.match(first.name)
    if not match:
        return [first]
    count = int(match.group("count"))
    return [first.with_name(f"{match.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def inspect_split(first: Path, *, with_sha256: bool = True) -> GGUFSummary:
    """Summarise a split GGUF as one model: weights and types over all shards, real bits per weight, shards.

    ``sha256`` is the first shard's (the whole file's when not split); ``with_sha256=False`` leaves it empty.
    """
    paths = split_shards(first)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise GGUFError(f"split GGUF {str(first)!r} is incomplete: missing {missing}",
                        fix="re-create the split output; keep all shards in one directory")
    parts = [inspect_gguf(p, with_sha256=with_sha256) for p in paths]
    if len(parts) == 1:
        return parts[0]
    by_type: dict[str, int] = {}
    matrix: dict[str, int] = {}
    data_bits = 0.0
    for part in parts:
        for name, count in part.weights_by_type.items():
            by_type[name] = by_type.get(name, 0) + count
        for name, count in part.matrix_weights_by_type.items():
            matrix[name] = matrix.get(name, 0) + count
        data_bits += part.bits_per_weight * sum(part.weights_by_type.values())
    total = sum(by_type.values())
    head = parts[0]
    return GGUFSummary(
        path=head.path, bytes=sum(p.bytes for p in parts), sha256=head.sha256, version=head.version,
        tensor_count=sum(p.tensor_count for p in parts), architecture=head.architecture,
        weights_by_type=dict(sorted(by_type.items())), bits_per_weight=round(data_bits / total, 4) if total else 0.0,
        matrix_weights_by_type=dict(sorted(matrix.items())), metadata=head.metadata,
        tensors=tuple(t for p in parts for t in p.tensors),
        shards=tuple({"path": p.path, "bytes": p.bytes, "sha256": p.sha256} for p in parts),
    )
