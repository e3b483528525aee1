"""What a worker has, what a process tree holds, and the guard that refuses a stage that cannot fit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from include.errors import ResourceError
from include.resources.guard import StageEstimate, check_fits, shortfall, stage_guard
from include.resources.memory import WorkerMemory, cgroup_memory, worker_memory
from include.resources.sampler import PeakSampler, alive, rss_anon, start_time, tree_anon

MB = 1_000_000
CONVERT = StageEstimate("convert", 3_000 * MB, {"task": 150 * MB, "converter": 460 * MB, "tensor": 2_390 * MB},
                        basis="largest tensor model.embed_tokens.weight (398,458,880 elements)",
                        fix="run it on a worker with more memory (workers.heavy_queue)")


def test_a_stage_that_cannot_fit_is_refused_with_the_numbers_and_the_fix():
    memory = WorkerMemory(mem_available=8_000 * MB, budget=2_000 * MB)
    assert memory.available == 2_000 * MB and memory.bound_by == "budget"
    with pytest.raises(ResourceError) as err:
        check_fits(CONVERT, memory)
    message = str(err.value)
    for phrase in ("stage 'convert' needs about 3,000 MB of memory at its peak",
                   "task 150 MB + converter 460 MB + tensor 2,390 MB", "largest tensor model.embed_tokens.weight",
                   "2,000 MB (MemAvailable 8,000 MB; budget workers.memory_budget_mb=2000) available",
                   "1,000 MB short", "Fix: run it on a worker with more memory (workers.heavy_queue)"):
        assert phrase in message, message
    assert not err.value.retryable
    # Inside the stage's own task process, the task's share is allocated already.
    assert shortfall(CONVERT, memory, running=True) == 850 * MB
    assert shortfall(CONVERT, WorkerMemory(mem_available=2_900 * MB), running=True) is None
    assert shortfall(CONVERT, WorkerMemory(mem_available=None)) is None  # nothing known: not refused


def test_a_stage_that_fits_only_once_other_work_ends_is_retried():
    busy = WorkerMemory(mem_available=1_000 * MB, mem_total=24_000 * MB)
    assert busy.capacity == 24_000 * MB
    with pytest.raises(ResourceError) as err:
        check_fits(CONVERT, busy, running=True)
    assert err.value.retryable  # the memory comes back when the other work ends: Airflow tries again later
    assert "fits the worker's 24,000 MB once other work ends, so the task is tried again later" in str(err.value)
    assert "wait for (or stop) what holds the memory" in str(err.value)
    assert shortfall(CONVERT, busy, idle=True) is None


def test_the_cgroup_caps_what_the_worker_has():
    memory = WorkerMemory(mem_available=8_000 * MB, cgroup_limit=4_000 * MB, cgroup_available=1_500 * MB)
    assert memory.available == 1_500 * MB and memory.bound_by == "cgroup"
    assert "cgroup limit 4,000 MB with 1,500 MB left" in memory.describe()


def test_worker_memory_reads_meminfo_and_the_budget():
    here = worker_memory()
    assert here.mem_available and here.mem_available > 0 and here.budget is None
    assert worker_memory(100).available == 100 * MB and worker_memory(100).bound_by == "budget"
    assert worker_memory(100).as_record()["budget"] == 100 * MB


def test_the_limit_of_a_process_in_a_limited_cgroup_is_found(limited_cgroup):
    proc = subprocess.Popen(limited_cgroup.wrap([sys.executable, "-c", "import time; time.sleep(30)"]))
    try:
        deadline = time.monotonic() + 10
        while (found := cgroup_memory(proc.pid)) is None or found.path != limited_cgroup.path:
            assert time.monotonic() < deadline, f"the child never entered {limited_cgroup.path}"
            time.sleep(0.02)
        assert found.limit == 96 * 1024 * 1024 and found.available is not None
        assert found.available <= found.limit
    finally:
        proc.kill()
        proc.wait()


def test_the_sampler_counts_a_tree_s_anonymous_memory_not_its_file_pages(tmp_path: Path):
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(64 * 1024 * 1024))
    mapped = (f"import mmap, time; f = open({str(data)!r}, 'rb'); "
              "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
              "s = sum(m[i] for i in range(0, len(m), 4096)); time.sleep(0.3)")
    allocating = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
                  "'import time; x = bytearray(64 * 1024 * 1024); time.sleep(0.5)'], check=True)")
    peaks = {}
    for name, code in (("mapped", mapped), ("grandchild", allocating)):
        proc = subprocess.Popen([sys.executable, "-c", code])
        with PeakSampler(proc.pid, 0.01) as sampler:
            proc.wait()
        assert proc.returncode == 0
        peaks[name] = sampler.peak
    assert peaks["mapped"] < 40 * MB, peaks  # 64 MB of file pages read through mmap are not anonymous
    assert peaks["grandchild"] > 64 * 1024 * 1024, peaks  # a grandchild's allocation counts


def test_process_probes():
    me = os.getpid()
    assert rss_anon(me) > 0 and tree_anon(me) >= rss_anon(me)
    assert alive(me, start_time(me)) and not alive(me, (start_time(me) or 0) + 1)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert rss_anon(proc.pid) == 0 and not alive(proc.pid, None)


def test_the_guard_keeps_a_record_while_the_stage_runs_and_removes_it(tmp_path: Path):
    estimate = StageEstimate("merge", 200 * MB, {"task": 150 * MB, "blocks": 50 * MB})
    plenty = WorkerMemory(mem_available=10**12)
    with stage_guard(estimate, plenty, records=tmp_path, key="k") as run:
        assert len(list(tmp_path.glob("*.json"))) == 1
        assert run.stage == "merge" and run.estimate_bytes == 200 * MB
    assert not list(tmp_path.glob("*.json")) and run.peak() > 0
    with pytest.raises(ValueError), stage_guard(estimate, plenty, records=tmp_path, key="k"):
        raise ValueError("an ordinary failure")
    assert not list(tmp_path.glob("*.json"))
    too_small = WorkerMemory(mem_available=10 * MB)
    with pytest.raises(ResourceError, match="stage 'merge' needs about 200 MB"), \
            stage_guard(estimate, too_small, records=tmp_path, key="k"):
        pytest.fail("a stage that cannot fit started")
    assert not list(tmp_path.glob("*.json"))  # refused before any record
