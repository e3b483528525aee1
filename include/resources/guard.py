"""The stage guard: a heavy stage refuses to start when it cannot fit, and an OOM kill ends it without retries.

:func:`stage_guard` wraps a stage's work (the Airflow layer enters it at the start of ``execute``):

1. a record left by the previous try that the OOM killer ended (:mod:`include.resources.attempts`) fails the try at
   once with :class:`~include.errors.OutOfMemoryError`: running it again would run out of memory again;
2. the stage's :class:`StageEstimate` must fit what the worker has (:class:`~include.resources.memory.WorkerMemory`,
   plus what the task's processes already hold), else :class:`~include.errors.ResourceError` with the numbers and
   the fix, before anything is written;
3. while the stage runs: its attempt record exists (refreshed with the sampled peak), the task's process tree is
   sampled (:class:`~include.resources.sampler.PeakSampler`) and :data:`~include.resources.oom.current_stage` names
   the stage for tools that die of an OOM kill (:func:`~include.resources.oom.raise_if_oom_killed`);
4. an error while the kernel's OOM-kill counter rose (a tool or server killed, whatever error that caused) becomes
   an OutOfMemoryError; the record is removed however the stage ends, and the peak is logged next to the estimate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from include.errors import OutOfMemoryError, ResourceError
from include.resources import attempts
from include.resources.memory import MB, WorkerMemory
from include.resources.oom import (
    GENERIC_FIX,
    StageRun,
    counter_name,
    current_stage,
    oom_kills_between,
    read_oom_counters,
)
from include.resources.sampler import PeakSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageEstimate:
    """A stage's estimated peak anonymous memory (task process + its children), the terms it adds up, the header
    sizes it came from, and what to change when it does not fit."""

    stage: str
    peak_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    basis: str = ""
    fix: str = GENERIC_FIX

    def terms(self) -> str:
        """``a 120 MB + b 300 MB``: the named terms."""
        return " + ".join(f"{name} {value / MB:,.0f} MB" for name, value in self.parts.items() if value)

    def as_record(self) -> dict[str, Any]:
        """JSON-safe form (the plan's record)."""
        return {"stage": self.stage, "peak_bytes": self.peak_bytes, "parts": dict(self.parts), "basis": self.basis,
                "fix": self.fix}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> StageEstimate:
        """Back from :meth:`as_record`."""
        return cls(stage=record["stage"], peak_bytes=int(record["peak_bytes"]), parts=dict(record.get("parts") or {}),
                   basis=str(record.get("basis") or ""), fix=str(record.get("fix") or GENERIC_FIX))


TASK_PART = "task"  # the estimate's term for the task process itself


def shortfall(estimate: StageEstimate, memory: WorkerMemory, *, running: bool = False, idle: bool = False
              ) -> int | None:
    """Bytes missing for ``estimate`` on ``memory``; None when it fits or nothing is known.

    ``running``: the check runs inside the stage's task process, whose own memory (the estimate's ``task`` term) is
    allocated already and so not part of what is available. ``idle``: against the worker's capacity (nothing else
    running) instead of what is available now.
    """
    room = memory.capacity if idle else memory.available
    if room is None or estimate.peak_bytes <= 0:
        return None
    need = estimate.peak_bytes - (estimate.parts.get(TASK_PART, 0) if running and not idle else 0)
    missing = need - room
    return missing if missing > 0 else None


def check_fits(estimate: StageEstimate, memory: WorkerMemory, *, running: bool = False, where: str = "this worker"
               ) -> None:
    """ResourceError when ``estimate`` does not fit ``memory``, with the numbers and the fix.

    Not retryable when it exceeds the worker's capacity (MemTotal, the cgroup's limit, the budget): no retry adds
    memory. Retryable when it would fit once other work on the worker ended: the task is tried again later.
    """
    missing = shortfall(estimate, memory, running=running)
    if missing is None:
        return
    held = estimate.parts.get(TASK_PART, 0) if running else 0
    held_text = f" (the task process's {held / MB:,.0f} MB of it is allocated already)" if held else ""
    transient = shortfall(estimate, memory, idle=True) is None and memory.capacity is not None
    error = ResourceError(
        f"stage {estimate.stage!r} needs about {estimate.peak_bytes / MB:,.0f} MB of memory at its peak "
        f"({estimate.terms()}{'; ' + estimate.basis if estimate.basis else ''}){held_text}, but {where} has "
        f"{memory.describe()} available: {missing / MB:,.0f} MB short, so it would be OOM-killed"
        + (f"; it fits the worker's {memory.capacity / MB:,.0f} MB once other work ends, so the task is tried "
           "again later" if transient and memory.capacity else ""),
        fix=estimate.fix + ("; or wait for (or stop) what holds the memory" if transient else ""))
    error.retryable = transient
    raise error


def _previous_try(records: Path, key: str, stage: str, fix: str) -> None:
    """OutOfMemoryError when the previous try of ``key`` was killed by the OOM killer (see attempts)."""
    previous = attempts.take(records, key)
    if previous is None:
        return
    now = read_oom_counters()
    kills = attempts.oom_kills_since(previous, now)
    if not kills:
        log.info("the previous try of stage %s (pid %d) ended without cleaning up, but not by the OOM killer "
                 "(killed by a signal or lost): running it again", previous.stage, previous.pid)
        return
    peak = f"it peaked at {previous.peak_bytes / MB:,.0f} MB of anonymous memory (last sample)" \
        if previous.peak_bytes else "no peak was sampled"
    raise OutOfMemoryError(
        f"the previous try of stage {stage!r} (pid {previous.pid} on {previous.host}) was killed by the kernel's "
        f"OOM killer ({counter_name(previous.counters, now)}): {peak}, estimate "
        f"{previous.estimate_bytes / MB:,.0f} MB, available when it started: {previous.memory}. Not trying again: "
        "it would run out of memory the same way",
        fix=f"{fix}; then clear the task to run it again")


@contextmanager
def stage_guard(estimate: StageEstimate, memory: WorkerMemory, *, records: Path | None = None, key: str = "",
                sample_s: float = 0.25) -> Iterator[StageRun]:
    """Guard one stage (see the module docstring); ``records``: the attempt records' directory, ``key``: the task
    instance (dag, run, task, map index). Yields the :class:`StageRun` (its ``peak()`` is the sampled peak)."""
    if records is not None:
        _previous_try(records, key, estimate.stage, estimate.fix)
    pid = os.getpid()
    check_fits(estimate, memory, running=True)
    before = read_oom_counters()
    attempt = attempts.Attempt(key=key, stage=estimate.stage, estimate_bytes=estimate.peak_bytes,
                               memory=memory.describe(), counters=before)

    def refresh(peak: int) -> None:
        if records is not None:
            attempt.peak_bytes = peak
            attempts.write(records, attempt)

    if records is not None:
        attempts.sweep(records)
        attempts.write(records, attempt)
    sampler = PeakSampler(pid, sample_s, on_sample=refresh)
    run = StageRun(estimate.stage, estimate.peak_bytes, memory.describe(), estimate.fix, peak=lambda: sampler.peak)
    token = current_stage.set(run)
    try:
        with sampler:
            try:
                yield run
            except OutOfMemoryError:
                raise
            except Exception as err:
                after = read_oom_counters()
                if oom_kills_between(before, after):
                    raise OutOfMemoryError(
                        f"stage {estimate.stage!r} failed while the kernel's OOM killer was killing "
                        f"({counter_name(before, after)}): {err}; {run.figures()}", fix=estimate.fix) from err
                raise
    finally:
        current_stage.reset(token)
        if records is not None:
            attempts.finish(records, key)
        log.info("stage %s: peak anonymous memory of the task's processes %s MB (estimate %s MB)", estimate.stage,
                 f"{sampler.peak / MB:,.0f}", f"{estimate.peak_bytes / MB:,.0f}")
