"""Anonymous memory of a process and its descendants, sampled in a thread: what a stage really holds.

``RssAnon`` (``/proc/<pid>/status``), never RSS: pages of files a process maps or reads (the GGUF llama.cpp maps,
the safetensors the converter reads, shared libraries) are the kernel's page cache and are given back under
pressure; anonymous pages are what runs a machine out of memory. A stage's figure is the sum over the task process
and every child (the converter, llama-quantize, llama-imatrix, a llama.cpp server) at one moment; its peak is the
largest such sum seen.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path


def rss_anon(pid: int) -> int:
    """RssAnon of ``pid`` in bytes (0 when it is gone or has none, e.g. a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of ``/proc/<pid>/stat``): a pid with
    another start time is another process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else None


def alive(pid: int, started: int | None) -> bool:
    """Whether the process ``pid`` that started at ``started`` still exists (and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:].split()[:1]
    return state != [b"Z"] and (started is None or start_time(pid) == started)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children, their children, ...), through ``/proc/<pid>/task/*/children``."""
    out: list[int] = []
    todo = _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += _children(child)
    return out


def tree_anon(pid: int) -> int:
    """RssAnon of ``pid`` plus all its descendants, in bytes."""
    return rss_anon(pid) + sum(rss_anon(child) for child in descendants(pid))


class PeakSampler:
    """Samples :func:`tree_anon` of ``pid`` every ``interval_s`` in a daemon thread; ``peak`` is the largest sum.

    ``on_sample(peak)`` (optional) is called from the thread with the peak so far every ``report_s`` seconds and
    whenever it grew by 10 % (the stage guard writes it into the attempt record, so a try the kernel kills leaves
    its last figure).
    """

    def __init__(self, pid: int, interval_s: float = 0.25, *, on_sample: Callable[[int], None] | None = None,
                 report_s: float = 2.0) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._on_sample = on_sample
        self._report_s = report_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"anon-sampler-{pid}")

    def sample(self) -> int:
        """Take one sample now; returns it."""
        value = tree_anon(self.pid)
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def _run(self) -> None:
        reported, reported_peak = float("-inf"), 0
        while not self._stop.wait(self.interval_s):
            self.sample()
            # Reported every report_s, and at once when the peak grew by a tenth: a stage about to be killed is
            # usually growing, and its last figure is the one worth keeping.
            due = time.monotonic() - reported >= self._report_s or self.peak > reported_peak * 1.1
            if self._on_sample is not None and due:
                reported, reported_peak = time.monotonic(), self.peak
                with contextlib.suppress(OSError):  # a record that cannot be written must not stop the sampling
                    self._on_sample(self.peak)

    def __enter__(self) -> PeakSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
