"""Was it the OOM killer? The kernel's OOM-kill counters, read before and after, answer for a SIGKILL.

A process killed by SIGKILL looks the same whoever sent the signal: the kernel's OOM killer, a user's ``kill -9``,
a supervisor's timeout. The kernel counts its own kills: ``oom_kill`` in ``/proc/vmstat`` (the machine), in
``memory.oom_control`` (cgroup v1, per cgroup: summed here over this process's cgroup and those below it) and in
``memory.events`` (cgroup v2, which already counts the cgroups below). A SIGKILL while the counter rose is an OOM
kill; the cgroup's counter is preferred when both readings have it (another container's OOM does not count), the
machine's otherwise.

:func:`raise_if_oom_killed` turns such a death of a tool (the converter, llama-quantize, llama-imatrix, a llama.cpp
server) into :class:`~include.errors.OutOfMemoryError`, which is not retried: the same stage on the same worker
would be killed again. The message names the stage and the memory it had, from the :class:`StageRun` the stage
guard (:mod:`include.resources.guard`) publishes in :data:`current_stage` while the stage runs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from include.errors import OutOfMemoryError
from include.resources.memory import MB, memory_cgroup_dir


@dataclass(frozen=True)
class OomCounters:
    """The OOM-kill counters at one moment: the machine's and this process's memory cgroup's (None: unreadable)."""

    system: int | None
    cgroup: int | None = None
    cgroup_path: str | None = None

    def as_record(self) -> dict[str, int | str | None]:
        """JSON-safe form (attempt records keep it)."""
        return {"system": self.system, "cgroup": self.cgroup, "cgroup_path": self.cgroup_path}

    @classmethod
    def from_record(cls, record: dict[str, object]) -> OomCounters:
        """Back from :meth:`as_record`."""
        def number(key: str) -> int | None:
            value = record.get(key)
            return value if isinstance(value, int) else None

        path = record.get("cgroup_path")
        return cls(number("system"), number("cgroup"), path if isinstance(path, str) else None)


def _oom_kill_line(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
    except OSError:
        return None
    return None


def read_oom_counters(pid: int | str = "self") -> OomCounters:
    """The OOM-kill counters now, for the memory cgroup of ``pid``."""
    system = _oom_kill_line(Path("/proc/vmstat"))
    found = memory_cgroup_dir(pid)
    if found is None:
        return OomCounters(system)
    directory, version = found
    if version == 2:
        return OomCounters(system, _oom_kill_line(directory / "memory.events"), str(directory))
    total, seen = 0, False
    for current, _dirs, files in os.walk(directory):
        if "memory.oom_control" in files:
            value = _oom_kill_line(Path(current) / "memory.oom_control")
            if value is not None:
                total, seen = total + value, True
    return OomCounters(system, total if seen else None, str(directory))


def oom_kills_between(before: OomCounters, after: OomCounters) -> int | None:
    """How many OOM kills the kernel counted between two readings (None: not comparable or not readable)."""
    if before.cgroup is not None and after.cgroup is not None and before.cgroup_path == after.cgroup_path:
        return max(0, after.cgroup - before.cgroup)
    if before.system is not None and after.system is not None:
        return max(0, after.system - before.system)
    return None


def counter_name(before: OomCounters, after: OomCounters) -> str:
    """Which counter :func:`oom_kills_between` compared, for messages."""
    if before.cgroup is not None and after.cgroup is not None and before.cgroup_path == after.cgroup_path:
        return f"the OOM-kill counter of memory cgroup {before.cgroup_path} went {before.cgroup} -> {after.cgroup}"
    return f"the machine's OOM-kill counter (/proc/vmstat oom_kill) went {before.system} -> {after.system}"


@dataclass
class StageRun:
    """The stage running now, as the guard publishes it for messages: its name, estimate, memory and fix."""

    stage: str
    estimate_bytes: int
    memory: str  # the worker's memory when the stage started (WorkerMemory.describe())
    fix: str
    peak: Callable[[], int] = field(default=lambda: 0)  # the task's sampled peak so far (bytes)

    def figures(self) -> str:
        """``the task's processes peaked at ... (estimate ...); available when it started: ...``."""
        peak = self.peak()
        measured = f"the task's processes peaked at {peak / MB:,.0f} MB of anonymous memory" if peak else \
            "no peak was sampled"
        return (f"{measured} (estimate {self.estimate_bytes / MB:,.0f} MB); available when stage {self.stage!r} "
                f"started: {self.memory}")


current_stage: ContextVar[StageRun | None] = ContextVar("lora_deploy_stage", default=None)

GENERIC_FIX = ("run the stage on a worker with more memory (workers.heavy_queue), or lower what it needs (fewer "
               "quant types per worker, merge.backend: fused, fidelity.mode / fidelity.enabled)")


def raise_if_oom_killed(returncode: int, before: OomCounters, what: str) -> None:
    """OutOfMemoryError when ``returncode`` is a SIGKILL and the OOM-kill counter rose since ``before``."""
    if returncode != -signal.SIGKILL:
        return
    after = read_oom_counters()
    kills = oom_kills_between(before, after)
    if not kills:
        return
    run = current_stage.get()
    figures = f"; {run.figures()}" if run is not None else ""
    raise OutOfMemoryError(
        f"{what} was killed by the kernel's OOM killer (SIGKILL; {counter_name(before, after)})"
        + figures,
        fix=run.fix if run is not None else GENERIC_FIX)
