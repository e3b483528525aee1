"""An OOM kill says so and is not retried; a plain SIGKILL stays a normal failure that Airflow retries.

The kernel tests put a real child process into a memory cgroup limited to 96 MB (``limited_cgroup``) and let the
kernel's OOM killer end it; they skip with the reason where no cgroup can be created, and the decision logic is then
still tested with recorded counters.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from include.errors import HealthError, OutOfMemoryError
from include.gguf.tools import run_streaming
from include.resources.attempts import Attempt, oom_kills_since, write
from include.resources.guard import StageEstimate, stage_guard
from include.resources.memory import WorkerMemory
from include.resources.oom import OomCounters, read_oom_counters
from include.resources.sampler import start_time
from tests.conftest import ROOT

ALLOCATE = [sys.executable, "-c", "x = bytearray(400 * 1024 * 1024); print(len(x))"]
PLENTY = WorkerMemory(mem_available=10**12)
KEY = "deploy_m/manual__1/convert/-1"
# One try of a stage in its own process: guarded, then it grows until killed, waits to be killed, or just runs.
TRY = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from include.resources.guard import StageEstimate, stage_guard
from include.resources.memory import WorkerMemory
records, key, action = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
estimate = StageEstimate("convert", 80_000_000, {"task": 30_000_000, "logits": 50_000_000},
                         fix="give the fidelity gate more memory")
with stage_guard(estimate, WorkerMemory(mem_available=10**12), records=records, key=key, sample_s=0.05):
    if action == "allocate":  # grows like a stage does, until the kernel kills it
        chunks = []
        while True:
            chunks.append(bytearray(8 * 1024 * 1024))
            time.sleep(0.02)
    elif action == "wait":
        Path(sys.argv[4]).write_text("started")
        time.sleep(120)
print("ran", flush=True)
"""


def a_try(records: Path, action: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", TRY, str(records), KEY, action, *extra]


def test_a_tool_killed_by_the_oom_killer_raises_a_non_retryable_error(limited_cgroup):
    estimate = StageEstimate("quantize", 50_000_000, {"task": 10_000_000, "tensor": 40_000_000},
                             fix="quantize on a worker with more memory")
    with pytest.raises(OutOfMemoryError) as err, stage_guard(estimate, PLENTY):
        run_streaming(limited_cgroup.wrap(ALLOCATE), env=dict(os.environ), what="llama-quantize Q4_K_M")
    message = str(err.value)
    for phrase in ("llama-quantize Q4_K_M was killed by the kernel's OOM killer", "(SIGKILL; the OOM-kill counter",
                   "estimate 50 MB", "available when stage 'quantize' started", "Fix: quantize on a worker"):
        assert phrase in message, message
    assert not err.value.retryable and isinstance(err.value, MemoryError)


def test_a_plain_sigkill_of_a_tool_is_returned_as_a_normal_failure():
    code = "import os, signal; print('bye', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    with stage_guard(StageEstimate("quantize", 1), PLENTY):
        returncode, tail = run_streaming([sys.executable, "-c", code], env=dict(os.environ), what="tool")
    assert returncode == -signal.SIGKILL and tail == ["bye"]


def test_a_stage_failing_while_the_oom_killer_kills_is_reported_as_oom(limited_cgroup):
    smoke = StageEstimate("smoke", 1, fix="serve it elsewhere")
    with pytest.raises(OutOfMemoryError, match=r"stage 'smoke' failed while the kernel's OOM killer was killing .*"
                                               r"server exited with code -9.*Fix: serve it elsewhere"), \
            stage_guard(smoke, PLENTY):
        proc = subprocess.run(limited_cgroup.wrap(ALLOCATE), capture_output=True)
        raise HealthError(f"llama_cpp.server exited with code {proc.returncode}")
    with pytest.raises(HealthError), stage_guard(StageEstimate("smoke", 1), PLENTY):  # no OOM: the error itself
        raise HealthError("not ready")


def test_the_try_after_an_oom_killed_task_process_fails_at_once(limited_cgroup, tmp_path):
    records = tmp_path / "attempts"
    first = subprocess.run(limited_cgroup.wrap(a_try(records, "allocate")), cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert len(list(records.glob("*.json"))) == 1  # the killed try could not clean up its record
    limited_cgroup.limit(None)  # the next try runs in the same cgroup (the same worker), with room
    second = subprocess.run(limited_cgroup.wrap(a_try(records, "nothing")), cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 1 and "ran" not in second.stdout
    for phrase in ("OutOfMemoryError: the previous try of stage 'convert'", "was killed by the kernel's OOM killer",
                   "it peaked at", "MB of anonymous memory (last sample), estimate 80 MB", "Not trying again",
                   "Fix: give the fidelity gate more memory; then clear the task"):
        assert phrase in second.stderr, second.stderr
    third = subprocess.run(limited_cgroup.wrap(a_try(records, "nothing")), cwd=ROOT, capture_output=True, text=True)
    assert third.returncode == 0 and "ran" in third.stdout, third.stderr  # the verdict was given once
    assert not list(records.glob("*.json"))


def test_the_try_after_a_plain_kill_runs_normally(tmp_path):
    records, ready = tmp_path / "attempts", tmp_path / "ready"
    first = subprocess.Popen(a_try(records, "wait", str(ready)), cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first try never started its stage"
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGKILL)  # a user's kill -9: the OOM counters do not move
    assert first.wait() == -signal.SIGKILL
    assert len(list(records.glob("*.json"))) == 1
    second = subprocess.run(a_try(records, "nothing"), cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0 and "ran" in second.stdout, second.stderr
    assert "ended without cleaning up, but not by the OOM killer" in second.stderr
    assert not list(records.glob("*.json"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_verdict_from_recorded_counters(tmp_path):
    recorded = Attempt(key=KEY, stage="convert", estimate_bytes=80_000_000, memory="8,000 MB (MemAvailable 8,000 MB)",
                       counters=OomCounters(system=3, cgroup=7, cgroup_path="/x"), pid=_dead_pid(), pid_start=None,
                       peak_bytes=123_000_000)
    assert oom_kills_since(recorded, OomCounters(system=4, cgroup=7, cgroup_path="/x")) == 0  # not in our cgroup
    assert oom_kills_since(recorded, OomCounters(system=4, cgroup=9, cgroup_path="/x")) == 2
    assert oom_kills_since(recorded, OomCounters(system=5, cgroup=1, cgroup_path="/y")) == 2  # the machine's counter
    assert oom_kills_since(dataclasses.replace(recorded, host="elsewhere"), OomCounters(system=9)) is None
    running = dataclasses.replace(recorded, pid=os.getpid(), pid_start=start_time(os.getpid()))
    assert oom_kills_since(running, OomCounters(system=9)) is None

    now = read_oom_counters()
    assert now.system is not None
    write(tmp_path, dataclasses.replace(recorded, counters=OomCounters(system=now.system - 1)))
    estimate = StageEstimate("convert", 80_000_000, fix="use a larger worker")
    with pytest.raises(OutOfMemoryError, match=r"previous try of stage 'convert' \(pid \d+ on .*peaked at 123 MB.*"
                                               r"estimate 80 MB.*Fix: use a larger worker; then clear the task"), \
            stage_guard(estimate, PLENTY, records=tmp_path, key=KEY):
        pytest.fail("the stage ran after an OOM-killed try")
    with stage_guard(estimate, PLENTY, records=tmp_path, key=KEY):  # given once: a cleared task runs
        assert len(list(tmp_path.glob("*.json"))) == 1  # this try's own record, while it runs
    assert not list(tmp_path.glob("*.json"))
