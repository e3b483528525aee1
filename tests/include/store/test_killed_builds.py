"""kill -9 of a build half way (the streaming merge, the GGUF conversion), each in a child process through the
artifact store: the retry succeeds and nothing hidden is left in the stage directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from include.store.artifacts import MANIFEST, ArtifactStore
from tests.conftest import ROOT

MERGE_INPUTS = {"adapter": "checkpoint-20", "base": "demo", "backend": "streaming"}
CONVERT_INPUTS = {"merged": "demo-base", "outtype": "f16"}

# The merge is held half way through its output (not slowed): the kill lands there every time.
SLOW_MERGE = """
import json, sys, time
from pathlib import Path
import include.merge.arithmetic, include.merge.streaming
from include.merge.backends import merge_model
from include.store.artifacts import ArtifactStore
include.merge.arithmetic.BLOCK_BYTES = 8192
real = include.merge.streaming.output_jobs
def slow(*args):
    for done, chunk in enumerate(real(*args)):
        yield chunk
        if done == 3:  # held half way: the writer has written 4 chunks to the partial file and waits for more
            time.sleep(3600)
include.merge.streaming.output_jobs = slow
root, base, adapter = map(Path, sys.argv[1:4])
ArtifactStore(root).build("m", "merged", json.loads(sys.argv[4]), lambda tmp: merge_model(
    base, adapter, tmp, backend="streaming", max_shard_bytes=1 << 20))
"""

# The build is held once the converter has written its staged output and exited, before the build checks and
# publishes it: the kill lands there every time, however fast the tiny model converts or however loaded the
# machine is (a kill timed against the converter's own writing could lose the race).
CONVERT = """
import json, sys, time
from pathlib import Path
import include.gguf.convert
from include.gguf.convert import convert_to_gguf
from include.gguf.toolchain import pinned_toolchain
from include.store.artifacts import ArtifactStore
real = include.gguf.convert.run_streaming
def held(*args, **kwargs):
    result = real(*args, **kwargs)
    time.sleep(3600)
    return result
include.gguf.convert.run_streaming = held
root, base = map(Path, sys.argv[1:3])
ArtifactStore(root).build("m", "gguf", json.loads(sys.argv[3]), lambda tmp: {
    "gguf": convert_to_gguf(base, tmp / "m-F16.gguf", toolchain=pinned_toolchain()).as_record()})
"""


def kill_when(code: str, args: list[str], ready: Callable[[], bool], timeout_s: float = 120) -> None:
    """Run ``code`` in a child process group and SIGKILL the whole group (the converter too) once ``ready()``."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, f"the build ended (exit {proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "the build never reached the point to kill it at"
            time.sleep(0.005)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            wait_group_gone(proc.pid)


def wait_group_gone(pgid: int, timeout_s: float = 10) -> None:
    """Wait until no live process of group ``pgid`` is left (zombies count as gone). A retry comes after the killed
    task is dead, its tools too: a tool still dying would still hold what it held (an inherited lock, a file)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields after "(comm)": state, ppid, pgrp, ...
                alive.append(stat.parent.name)
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes {alive} of the killed group {pgid} are still alive"
        time.sleep(0.01)


def hidden(directory: Path) -> list[str]:
    """Every hidden name under ``directory`` (scratch, locks, partial files, trash)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*"))


def test_kill_9_mid_merge_then_the_retry_leaves_nothing_behind(tmp_path: Path, demo_inputs) -> None:
    from include.merge.backends import merge_model

    stage = tmp_path / "m" / "merged"
    adapter = demo_inputs.training_box / "checkpoint-20"
    kill_when(SLOW_MERGE, [str(tmp_path), str(demo_inputs.base), str(adapter), json.dumps(MERGE_INPUTS)],
              lambda: any(stage.glob(".*.tmp-*/.out.merging-*/.model*.safetensors.partial")))
    left = hidden(stage)
    assert any(".merging-" in n for n in left) and any(n.endswith(".safetensors.partial") for n in left), left
    assert not [p for p in stage.iterdir() if not p.name.startswith(".")]  # nothing complete-looking

    store = ArtifactStore(tmp_path)  # the retry
    result = store.build("m", "merged", MERGE_INPUTS, lambda tmp: merge_model(
        demo_inputs.base, adapter, tmp, backend="streaming", max_shard_bytes=1 << 20))
    assert not result.reused and (result.path / MANIFEST).is_file()
    assert [p.name for p in stage.iterdir()] == [result.path.name] and hidden(stage) == []


def test_kill_9_mid_convert_then_the_retry_leaves_nothing_behind(tmp_path: Path, demo_inputs) -> None:
    from include.gguf.convert import convert_to_gguf
    from include.gguf.toolchain import pinned_toolchain

    stage = tmp_path / "m" / "gguf"
    kill_when(CONVERT, [str(tmp_path), str(demo_inputs.base), json.dumps(CONVERT_INPUTS)],
              lambda: any(stage.glob(".*.tmp-*/out/.m-F16.gguf.part-*")))  # the build is held: no race
    left = hidden(stage)
    assert any(".part-" in n for n in left) and any(".tmp-" in n for n in left), left

    store = ArtifactStore(tmp_path)  # the retry
    result = store.build("m", "gguf", CONVERT_INPUTS, lambda tmp: {
        "gguf": convert_to_gguf(demo_inputs.base, tmp / "m-F16.gguf", toolchain=pinned_toolchain()).as_record()})
    assert not result.reused and (result.path / "m-F16.gguf").is_file()
    assert [p.name for p in stage.iterdir()] == [result.path.name] and hidden(stage) == []
