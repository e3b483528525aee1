"""Torch-free safetensors reading and streaming sharded writing, checked against the safetensors library."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from include.errors import SafetensorsFormatError
from include.merge.safetensors_io import (
    INDEX_FILE,
    SINGLE_FILE,
    TensorInfo,
    TensorSpec,
    iter_tensor_bytes,
    iter_tensor_chunks,
    list_model_tensors,
    read_header,
    read_tensor,
)
from include.merge.writer import ShardedWriter, plan_shards, shard_names


def reference_tensors() -> dict[str, torch.Tensor]:
    """A mix of dtypes and shapes, including a scalar, an empty tensor and a non-float one."""
    gen = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(64, 48, generator=gen),
        "b.f16": torch.randn(33, 7, generator=gen).half(),
        "c.bf16": torch.randn(128, 16, generator=gen).bfloat16(),
        "d.scalar": torch.tensor(3.5),
        "e.empty": torch.zeros(0, 5),
        "f.i64": torch.arange(10, dtype=torch.int64),
    }


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            names = handle.keys()
            out.update({k: handle.get_tensor(k) for k in names})
    return out


def test_reader_matches_safetensors_library(tmp_path: Path) -> None:
    ref = reference_tensors()
    path = tmp_path / "x.safetensors"
    save_file(ref, path, metadata={"format": "pt", "note": "hi"})
    tensors, metadata = read_header(path)
    assert metadata == {"format": "pt", "note": "hi"}
    assert set(tensors) == set(ref)
    offsets = [t.offset for t in tensors.values()]
    assert offsets == sorted(offsets)  # file order
    for name, want in ref.items():
        info = tensors[name]
        assert info.shape == tuple(want.shape)
        assert b"".join(c.tobytes() for c in iter_tensor_bytes(info, chunk_bytes=7)) == as_numpy(want).tobytes()
        if name == "f.i64":
            with pytest.raises(SafetensorsFormatError, match=r"'f\.i64' has dtype 'I64', which cannot be decoded"):
                read_tensor(info)
            continue
        got = read_tensor(info)
        assert got.dtype == as_numpy(want).dtype and got.shape == tuple(want.shape)
        assert got.tobytes() == as_numpy(want).tobytes()
        chunks = list(iter_tensor_chunks(info, chunk_bytes=100))
        assert all(c.nbytes <= 100 for c in chunks)
        assert np.concatenate([c.reshape(-1) for c in chunks] or [got.reshape(-1)]).tobytes() == got.tobytes()


def _write(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    specs = [TensorSpec(n, codes[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(directory, specs, max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in tensors.items():
            if tensor.dtype == torch.int64:
                writer.write_bytes(name, [tensor.numpy().tobytes()])
            else:
                writer.write(name, as_numpy(tensor))
        return writer.close()


def test_single_file_written_loads_in_safetensors(tmp_path: Path) -> None:
    ref = reference_tensors()
    assert _write(tmp_path, ref, max_shard_bytes=1 << 30) == [SINGLE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]  # no index, no temp files
    loaded = load_all(tmp_path)
    assert set(loaded) == set(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
    with safe_open(tmp_path / SINGLE_FILE, "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    raw = (tmp_path / SINGLE_FILE).read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0  # header padded: tensor data starts 8-byte aligned


def test_sharded_files_and_index(tmp_path: Path) -> None:
    ref = reference_tensors()  # bytes: a 12288 (over the limit: a shard of its own), b 462, c 4096, d+e+f 84
    files = _write(tmp_path, ref, max_shard_bytes=4096)
    shards = [f for f in files if f != INDEX_FILE]
    assert shards == shard_names(4) and shards[0] == "model-00001-of-00004.safetensors" and files[-1] == INDEX_FILE
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert list(index["weight_map"]) == sorted(ref)
    assert [index["weight_map"][k] for k in sorted(ref)] == [shards[i] for i in (0, 1, 2, 3, 3, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    loaded = load_all(tmp_path)
    assert set(loaded) == set(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
    listed = list_model_tensors(tmp_path)
    assert list(listed) == list(ref)  # file/offset order = write order
    assert read_tensor(listed["c.bf16"]).tobytes() == as_numpy(ref["c.bf16"]).tobytes()


@pytest.mark.parametrize(
    ("sizes", "limit", "expected"),
    [([10, 10, 10], 20, [[10, 10], [10]]), ([30, 5, 5], 20, [[30], [5, 5]]), ([5], 1, [[5]]), ([], 10, [[]])],
)
def test_plan_shards(sizes: list[int], limit: int, expected: list[list[int]]) -> None:
    specs = [TensorSpec(f"t{i}", "U8", (n,)) for i, n in enumerate(sizes)]
    assert [[s.nbytes for s in shard] for shard in plan_shards(specs, limit)] == expected


def test_writer_rejects_misuse_and_leaves_nothing(tmp_path: Path) -> None:
    specs = [TensorSpec("x", "F32", (2, 2)), TensorSpec("y", "BF16", (3,))]
    with (
        pytest.raises(SafetensorsFormatError, match=r"closed before tensor 'x' \(0/2\)"),
        ShardedWriter(tmp_path, specs) as writer,
    ):
        with pytest.raises(SafetensorsFormatError, match=r"'y' written out of order; expected 'x'"):
            writer.write("y", np.zeros(3, dtype=ml_dtypes.bfloat16))
        with pytest.raises(SafetensorsFormatError, match=r"'x' is float16 \[2, 2\], planned F32 \[2, 2\]"):
            writer.write("x", np.zeros((2, 2), dtype=np.float16))
    assert list(tmp_path.iterdir()) == []  # the temp shard is deleted

    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(tmp_path, specs) as writer:
        writer.write("x", np.ones((2, 2), dtype=np.float32))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    writer = ShardedWriter(tmp_path, specs)
    writer.write("x", np.ones((2, 2), dtype=np.float32))
    with pytest.raises(SafetensorsFormatError, match=r"'y' got 4 bytes, planned 6"):
        writer.write_bytes("y", [b"\0" * 4])
    writer.write_bytes("y", [b"\0" * 6])
    with pytest.raises(SafetensorsFormatError, match=r"'z' written after all planned tensors"):
        writer.write_bytes("z", [b""])
    assert writer.close() == [SINGLE_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]

    with pytest.raises(SafetensorsFormatError, match="duplicate tensor names"):
        ShardedWriter(tmp_path, [specs[0], specs[0]])


def test_header_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(16, 16)}, good)
    blob = good.read_bytes()
    cases = {
        "truncated": (blob[:-10], r"spans bytes .* beyond the file.*Fix: the file is truncated"),
        "tiny": (b"\1\2", r"too short \(2 bytes\)"),
        "huge_header": ((10**12).to_bytes(8, "little") + b"{}", r"announces a 1000000000000-byte header"),
        "not_json": ((4).to_bytes(8, "little") + b"nope", r"invalid JSON header"),
        "bad_entry": ((13).to_bytes(8, "little") + b'{"w": {"a":1}', r"invalid JSON header"),
        "wrong_size": (None, r"has 1024 bytes, expected 2048"),
    }
    for name, (content, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if content is None:  # header says F64 for F32 data
            header = blob[8 : 8 + int.from_bytes(blob[:8], "little")].replace(b'"F32"', b'"F64"')
            content = len(header).to_bytes(8, "little") + header + blob[8 + len(header) :]
        path.write_bytes(content)
        with pytest.raises(SafetensorsFormatError, match=pattern):
            read_header(path)


def test_model_dir_listing_errors(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsFormatError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        list_model_tensors(tmp_path)
    _write(tmp_path, {"a": torch.ones(300), "b": torch.ones(300)}, max_shard_bytes=1500)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["c"] = index["weight_map"]["a"]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SafetensorsFormatError, match=r"maps 1 tensors to shards that lack them, e.g. 'c'"):
        list_model_tensors(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(SafetensorsFormatError, match=r"lists shard 'model-00002-of-00002\.safetensors', which is "
                                                     r"missing"):
        list_model_tensors(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{}")
    with pytest.raises(SafetensorsFormatError, match=r"not a valid safetensors index"):
        list_model_tensors(tmp_path)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_tensor_in_kernel_or_through_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 kernel_copy: bool) -> None:
    """With copy_file_range every byte moves in the kernel; without it (ENOTSUP) every byte goes through memory.

    Both paths are observed, not replaced: ``os.copy_file_range`` and the writer's ``iter_tensor_bytes`` are
    wrapped to record what they moved and call through to the real functions (the fallback case makes the
    kernel call fail, as on an old kernel or a filesystem without it).
    """
    import include.merge.writer as writer_module

    ref = reference_tensors()
    save_file(ref, tmp_path / "src.safetensors")
    infos, _ = read_header(tmp_path / "src.safetensors")
    total = sum(info.nbytes for info in infos.values())
    in_kernel: list[int] = []  # bytes per successful copy_file_range call
    refused: list[OSError] = []
    through_memory: list[int] = []  # bytes per tensor (rest) read by the fallback
    real_copy, real_iter = os.copy_file_range, writer_module.iter_tensor_bytes

    def observed_copy(*args: int) -> int:
        try:
            if not kernel_copy:
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            n = real_copy(*args)
        except OSError as error:
            refused.append(error)
            raise
        in_kernel.append(n)
        return n

    def observed_iter(info: TensorInfo, *args: int, **kwargs: int) -> Iterator[np.ndarray]:
        through_memory.append(info.nbytes)
        return real_iter(info, *args, **kwargs)

    monkeypatch.setattr(writer_module.os, "copy_file_range", observed_copy)
    monkeypatch.setattr(writer_module, "iter_tensor_bytes", observed_iter)
    out = tmp_path / "out"
    out.mkdir()
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in infos.items()]
    with ShardedWriter(out, specs, max_shard_bytes=4096) as writer:
        for name, info in infos.items():
            writer.copy_tensor(name, info)
    got = load_all(out)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    (tmp_path / "x").mkdir()
    with pytest.raises(SafetensorsFormatError, match=r"cannot copy F32"), \
            ShardedWriter(tmp_path / "x", [TensorSpec("a.f32", "BF16", (64, 48))]) as writer:
        writer.copy_tensor("a.f32", infos["a.f32"])
    assert list((tmp_path / "x").iterdir()) == []  # the partial file is removed
    if kernel_copy:
        if refused:
            pytest.skip(f"copy_file_range is refused under {tmp_path}: {refused[0]}")
        assert sum(in_kernel) == total and through_memory == []
    else:
        assert len(refused) == sum(1 for info in infos.values() if info.nbytes)  # tried once per non-empty tensor
        assert in_kernel == [] and sum(through_memory) == total
