"""Scratch names and the sweep: liveness by flock (a live writer in another process is spared, a killed one is not),
lock-less names of older versions, resume caches, kinds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from include.store import scratch
from tests.conftest import ROOT

HOLD = """
import sys, time
from pathlib import Path
from include.store import scratch
path = scratch.claim(Path(sys.argv[1]), sys.argv[2], directory=sys.argv[3] == "dir")
(path / "half.bin" if path.is_dir() else path).write_bytes(b"x" * 1000)
print(path, flush=True)
time.sleep(120)
"""


def hold(final: Path, kind: str, directory: bool = True) -> tuple[subprocess.Popen[str], Path]:
    """A child process that claims a scratch beside ``final`` and keeps writing it (sleeps) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(final), kind, "dir" if directory else "file"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("directory", [True, False], ids=["dir", "file"])
def test_a_live_writer_in_another_process_is_spared_and_a_killed_one_swept(tmp_path: Path, directory: bool) -> None:
    proc, path = hold(tmp_path / "out", "part", directory)
    try:
        assert scratch.SCRATCH.match(path.name) and path.name.startswith(".out.part-")
        assert scratch.sweep(tmp_path) == [] and path.exists()
        assert scratch.owner_alive(path)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert not scratch.owner_alive(path)
    swept = scratch.sweep(tmp_path)
    assert [s.path for s in swept] == [path] and swept[0].bytes == 1000
    assert names(tmp_path) == []


def test_claim_finish_and_discard_leave_nothing_but_the_output(tmp_path: Path) -> None:
    work = scratch.claim(tmp_path / "model", "merging")
    (work / "weights.bin").write_bytes(b"w")
    scratch.finish(work, tmp_path / "model")
    assert names(tmp_path) == ["model"] and names(tmp_path / "model") == ["weights.bin"]
    part = scratch.claim(tmp_path / "a.gguf", "part", directory=False)
    part.write_bytes(b"g")
    scratch.finish(part, tmp_path / "a.gguf")
    gone = scratch.claim(tmp_path / "b", "tmp")
    scratch.discard(gone)
    assert names(tmp_path) == ["a.gguf", "model"] and not scratch._held


def test_a_scratch_deleted_by_other_code_does_not_keep_its_lock_open(tmp_path: Path) -> None:
    import shutil

    stage = scratch.claim(tmp_path / "merged", "merging")
    shutil.rmtree(stage)  # what a merge backend does when it fails
    assert names(tmp_path) == []  # the lock file went with the directory
    other = scratch.claim(tmp_path / "other", "merging")
    assert list(scratch._held) == [str(other)]  # the forgotten lock was closed
    scratch.discard(other)


def test_lockless_names_count_as_dead_once_old_and_trash_at_once(tmp_path: Path) -> None:
    legacy = tmp_path / "..0123.tmp-77-ab.merging-77"  # a merge stage of an older version
    legacy.mkdir()
    young = tmp_path / ".0123.tmp-12-cd"
    young.mkdir()
    trash = tmp_path / ".0123.trash-x-1-ef"
    trash.mkdir()
    os.utime(legacy, (time.time() - 3600,) * 2)
    swept = {s.path.name for s in scratch.sweep(tmp_path)}
    assert swept == {legacy.name, trash.name}
    assert names(tmp_path) == [young.name]  # just created: its writer may be about to lock it
    assert [s.path for s in scratch.sweep(tmp_path, now=time.time() + 2 * scratch.LOCKLESS_GRACE_S)] == [young]


def test_resume_caches_go_only_when_asked_and_stale(tmp_path: Path) -> None:
    cache = tmp_path / scratch.resume_cache_name("abc")
    cache.mkdir()
    (cache / "adapter_model.safetensors").write_bytes(b"partial")
    assert scratch.sweep(tmp_path, resume_caches=True) == []  # fresh: a retry may resume it
    later = time.time() + 25 * 3600
    assert scratch.sweep(tmp_path, now=later) == []  # not asked for (a user's directory)
    assert [s.path for s in scratch.sweep(tmp_path, resume_caches=True, now=later)] == [cache]
    assert names(tmp_path) == []


def test_kinds_limit_what_is_swept_and_dry_runs_change_nothing(tmp_path: Path) -> None:
    for name in (".x.tmp-a-1-b", ".x.merging-a-1-b", ".notes.txt"):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1, 1))
    assert [s.path.name for s in scratch.sweep(tmp_path, kinds=("merging",), dry_run=True)] == [".x.merging-a-1-b"]
    assert len(names(tmp_path)) == 3
    assert [s.path.name for s in scratch.sweep(tmp_path, kinds=("merging",))] == [".x.merging-a-1-b"]
    assert names(tmp_path) == [".notes.txt", ".x.tmp-a-1-b"]  # not ours, and a kind not asked for


def test_trash_frees_only_what_has_no_other_hard_link(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "linked.gguf").write_bytes(b"a" * 100)
    (entry / "alone.gguf").write_bytes(b"b" * 50)
    os.link(entry / "linked.gguf", tmp_path / "installed.gguf")  # an LM Studio install
    assert scratch.freed_bytes(entry) == 50 and scratch.disk_bytes(entry) == 150
    assert scratch.trash(entry) == 50
    assert names(tmp_path) == ["installed.gguf"]
    with pytest.raises(ValueError, match="unknown scratch kind"):
        scratch.scratch_name("x", "temp")
