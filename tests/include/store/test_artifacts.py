"""The content-addressed artifact store: reuse, atomicity, leftovers of killed builds, force."""

from __future__ import annotations

import json
import os

import pytest

from include.store.artifacts import MANIFEST, ArtifactStore


def produce_text(text: str):
    calls = []

    def produce(tmp):
        calls.append(tmp)
        (tmp / "out.txt").write_text(text)
        return {"note": text}

    return produce, calls


def test_build_then_reuse(tmp_path):
    store = ArtifactStore(tmp_path)
    produce, calls = produce_text("a")
    first = store.build("m", "stage", {"x": 1}, produce)
    second = store.build("m", "stage", {"x": 1}, produce)
    assert len(calls) == 1
    assert not first.reused and second.reused
    assert first.path == second.path == tmp_path / "m" / "stage" / first.manifest["key"]
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["files"][0]["name"] == "out.txt" and manifest["note"] == "a"
    assert first.record()["sha256"] == second.record()["sha256"]


def test_other_inputs_other_key(tmp_path):
    store = ArtifactStore(tmp_path)
    a = store.build("m", "s", {"x": 1}, produce_text("a")[0])
    b = store.build("m", "s", {"x": 2}, produce_text("a")[0])
    assert a.path != b.path


def test_failed_build_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def explode(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.build("m", "s", {"x": 1}, explode)
    assert [p.name for p in (tmp_path / "m" / "s").iterdir()] == []


def test_directory_without_manifest_is_not_taken_as_complete(tmp_path):
    store = ArtifactStore(tmp_path)
    produce, calls = produce_text("good")
    key_dir = store.build("m", "s", {"x": 1}, produce).path
    (key_dir / MANIFEST).unlink()  # as if killed between the rename and the manifest
    (key_dir / "out.txt").write_text("truncat")
    assert store.lookup("m", "s", key_dir.name) is None
    rebuilt = store.build("m", "s", {"x": 1}, produce)
    assert len(calls) == 2 and not rebuilt.reused
    assert (rebuilt.path / "out.txt").read_text() == "good"


def test_temp_dirs_of_dead_builders_are_removed(tmp_path):
    store = ArtifactStore(tmp_path)
    produce, _ = produce_text("a")
    key = store.build("m", "s", {"x": 1}, produce, force=False).manifest["key"]
    dead = tmp_path / "m" / "s" / f".{key}.tmp-999999999-abcd"
    dead.mkdir()
    store.build("m", "s", {"x": 1}, produce, force=True)
    assert not dead.exists()


def test_force_rebuilds_and_replaces(tmp_path):
    store = ArtifactStore(tmp_path)
    produce, calls = produce_text("a")
    first = store.build("m", "s", {"x": 1}, produce)
    again = store.build("m", "s", {"x": 1}, produce, force=True)
    assert len(calls) == 2 and not again.reused and again.path == first.path
    assert sorted(os.listdir(first.path)) == [MANIFEST, "out.txt"]
