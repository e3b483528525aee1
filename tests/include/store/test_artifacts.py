"""The content-addressed artifact store: reuse, atomicity, leftovers of killed builds, force."""

from __future__ import annotations

import json
import os

import pytest

from include.store import leases, scratch
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
    assert not scratch._held  # no lock is left open either


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


def test_remains_of_dead_builds_of_any_key_are_removed_by_the_next_build_of_the_stage(tmp_path):
    store = ArtifactStore(tmp_path)
    produce, _ = produce_text("a")
    key = store.build("m", "s", {"x": 1}, produce, force=False).manifest["key"]
    stage = tmp_path / "m" / "s"
    legacy = stage / f".{key}.tmp-999999999-abcd"  # the name scheme of older versions: no lock at all
    legacy.mkdir()
    os.utime(legacy, (1, 1))
    dead = stage / ".0123456789abcdef.tmp-h-1-x"  # another key's build directory, its lock free (owner gone)
    (dead / "out").mkdir(parents=True)
    (dead / ".lock").touch()
    unfinished = stage / "fedcba9876543210"  # renamed into place, killed before its manifest
    unfinished.mkdir()
    store.build("m", "s", {"x": 2}, produce)
    assert not legacy.exists() and not dead.exists() and not unfinished.exists()
    assert sorted(p.name for p in stage.iterdir()) == sorted([key, store.key_of({"x": 2})])


def test_force_rebuilds_and_replaces(tmp_path):
    store = ArtifactStore(tmp_path)
    produce, calls = produce_text("a")
    first = store.build("m", "s", {"x": 1}, produce)
    again = store.build("m", "s", {"x": 1}, produce, force=True)
    assert len(calls) == 2 and not again.reused and again.path == first.path
    assert sorted(os.listdir(first.path)) == [MANIFEST, "out.txt"]
    assert sorted(os.listdir(first.path.parent)) == [first.path.name]  # no scratch, no lock, no trash left


def test_lookup_and_build_mark_the_entry_as_used_by_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "deploy_m")
    monkeypatch.setenv("AIRFLOW_CTX_DAG_RUN_ID", "manual__2026-01-01T00:00:00+00:00")
    store = ArtifactStore(tmp_path)
    key = store.build("m", "s", {"x": 1}, produce_text("a")[0]).manifest["key"]
    assert leases.fresh(tmp_path / "m", 60) == {("s", key): {"deploy_m/manual__2026-01-01T00:00:00+00:00":
                                                           pytest.approx(0, abs=5)}}
    other = ArtifactStore(tmp_path, holder="backfill")
    assert other.lookup("m", "s", key) is not None
    assert set(leases.fresh(tmp_path / "m", 60)[("s", key)]) == {"deploy_m/manual__2026-01-01T00:00:00+00:00",
                                                                "backfill"}


def test_a_collected_entry_is_a_miss_and_is_built_again(tmp_path):
    store = ArtifactStore(tmp_path)
    produce, calls = produce_text("a")
    first = store.build("m", "s", {"x": 1}, produce)
    scratch.trash(first.path)  # what collection does
    assert store.lookup("m", "s", first.manifest["key"]) is None
    again = store.build("m", "s", {"x": 1}, produce)
    assert len(calls) == 2 and not again.reused and (again.path / "out.txt").read_text() == "a"
