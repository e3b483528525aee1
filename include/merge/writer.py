"""Write sharded safetensors tensor by tensor: ``model.safetensors`` or ``model-0000i-of-0000n`` + index.

Every shard and header is planned up front, then each tensor streams to disk as it arrives (or is
copied inside the kernel with ``copy_file_range``), so memory stays at about one chunk. Files appear
under their final names only when complete.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from include.errors import SafetensorsFormatError
from include.merge.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorInfo,
    TensorSpec,
    iter_tensor_bytes,
    numpy_dtype,
)


def shard_names(count: int) -> list[str]:
    """File names for ``count`` shards, as transformers names them."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        end = offset + spec.nbytes
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer pads
    return struct.pack("<Q", len(blob)) + blob


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardedWriter:
    """Stream tensors into ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index.

    All tensors are declared up front (``specs``, in write order); then ``write`` / ``write_bytes``
    must be called once per tensor in that order. Files are written under hidden temp names and only
    renamed into place by ``close`` once every tensor is complete; the index (sharded case) is renamed
    last. Leaving the ``with`` block by an exception deletes the temp files.
    """

    def __init__(
        self,
        out_dir: Path,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = 2 * 1024**3,
        metadata: dict[str, str] | None = None,
        fsync: bool = True,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise SafetensorsFormatError("duplicate tensor names in the write plan")
        if max_shard_bytes < 1:
            raise SafetensorsFormatError(f"max_shard_bytes must be positive, got {max_shard_bytes!r}")
        self.out_dir = Path(out_dir)
        self.fsync = fsync
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(list(specs), max_shard_bytes) if specs else [[]]
        self.files = shard_names(len(self.shards))
        self._order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._shard = -1
        self._handle: Any = None
        self._temps: list[Path] = []
        self._written_in_tensor = 0
        self.bytes_written = 0
        self.closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            if not self.closed:
                self.close()
        else:
            self.abort()

    def _temp(self, name: str) -> Path:
        return self.out_dir / f".{name}.partial"

    def _open_shard(self, index: int) -> None:
        self._finish_handle()
        self._shard = index
        path = self._temp(self.files[index])
        self._temps.append(path)
        self._handle = path.open("wb", buffering=0)  # raw: big chunks go straight to the kernel
        self._write_all(memoryview(_header_bytes(self.shards[index], self.metadata)))

    def _write_all(self, view: memoryview) -> None:
        while view:
            view = view[self._handle.write(view):]

    def _finish_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            if self.fsync:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def _begin(self, name: str) -> TensorSpec:
        if self.closed or self._next >= len(self._order):
            raise SafetensorsFormatError(f"tensor {name!r} written after all planned tensors")
        shard, spec = self._order[self._next]
        if spec.name != name:
            raise SafetensorsFormatError(f"tensor {name!r} written out of order; expected {spec.name!r}")
        if shard != self._shard:
            self._open_shard(shard)
        return spec

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next planned tensor from a numpy array of the planned dtype and shape."""
        spec = self._begin(name)
        expected = numpy_dtype(spec.dtype, name=name)
        if array.dtype != expected or tuple(array.shape) != spec.shape:
            raise SafetensorsFormatError(
                f"tensor {name!r} is {array.dtype} {list(array.shape)}, planned {spec.dtype} {list(spec.shape)}"
            )
        self._write_chunks(spec, [np.ascontiguousarray(array).reshape(-1).view(np.uint8)])

    def write_bytes(self, name: str, chunks: Iterable[Any]) -> None:
        """Write the next planned tensor from chunks of raw little-endian bytes (buffers or uint8 arrays)."""
        self._write_chunks(self._begin(name), chunks)

    def copy_tensor(self, name: str, info: TensorInfo) -> None:
        """Write the next planned tensor as a byte copy of ``info`` (same dtype), inside the kernel when it can.

        ``os.copy_file_range`` moves the bytes without passing them through this process (and may share
        extents on filesystems that support it); a plain read/write loop is the fallback.
        """
        spec = self._begin(name)
        if info.nbytes != spec.nbytes or info.dtype != spec.dtype:
            raise SafetensorsFormatError(f"tensor {name!r}: cannot copy {info.dtype} {info.nbytes} bytes into "
                                         f"planned {spec.dtype} {spec.nbytes} bytes")
        done = 0
        with info.file.open("rb", buffering=0) as source:
            try:
                while done < info.nbytes:
                    n = os.copy_file_range(source.fileno(), self._handle.fileno(), info.nbytes - done,
                                           info.offset + done)
                    if n == 0:
                        raise SafetensorsFormatError(f"{str(info.file)!r}: file ends inside tensor {info.name!r}")
                    done += n
            except OSError:  # no copy_file_range here (old kernel, other filesystems): copy through memory
                pass
        if done < info.nbytes:
            rest = TensorInfo(info.name, info.dtype, info.shape, info.file, info.offset + done, info.nbytes - done)
            for chunk in iter_tensor_bytes(rest):
                self._write_all(memoryview(chunk))
        self.bytes_written += info.nbytes
        self._next += 1

    def _write_chunks(self, spec: TensorSpec, chunks: Iterable[Any]) -> None:
        total = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            self._write_all(view)
            total += len(view)
        if total != spec.nbytes:
            raise SafetensorsFormatError(f"tensor {spec.name!r} got {total} bytes, planned {spec.nbytes}")
        self.bytes_written += total
        self._next += 1

    def close(self) -> list[str]:
        """Finish: check every tensor was written, rename files into place, write the index; return file names."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            self.abort()
            raise SafetensorsFormatError(f"writer closed before tensor {missing!r} ({self._next}/{len(self._order)})")
        if self._shard != len(self.shards) - 1:  # no tensors at all: still write a valid empty file
            self._open_shard(len(self.shards) - 1)
        self._finish_handle()
        written = list(self.files)
        if len(self.files) > 1:  # index written first under a temp name, renamed into place last
            weight_map = {s.name: self.files[i] for i, s in self._order}
            index = {
                "metadata": {"total_size": sum(s.nbytes for _, s in self._order)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            temp = self._temp(INDEX_FILE)
            self._temps.append(temp)
            temp.write_text(json.dumps(index, indent=2) + "\n")
            written.append(INDEX_FILE)
        for name in written:
            os.replace(self._temp(name), self.out_dir / name)
        if self.fsync:
            _fsync_dir(self.out_dir)
        self.closed = True
        self._temps = []
        return written

    def abort(self) -> None:
        """Close and delete every temp file (files already renamed by ``close`` are left alone)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for temp in self._temps:
            temp.unlink(missing_ok=True)
        self._temps = []
        self.closed = True
