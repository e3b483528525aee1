"""Memory of running Airflow tasks, sampled from outside: per task instance and for the machine's Airflow.

A LocalExecutor task runs in a process titled ``airflow worker -- <task instance id>``; its RSS plus its
children's (the converter, ``llama-quantize``, a llama.cpp server) is that task's memory. The sampler
keeps every sample, so a caller can ask afterwards for the peak of any group of task instances (the
heavy ones, known from the REST API once the runs end) and for the peak of all Airflow processes.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import psutil

TASK_TITLE = re.compile(r"airflow worker -- ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@dataclass
class Sample:
    """One moment: seconds since start, RSS (bytes) per task instance id, of all processes, of the largest."""

    at_s: float
    tasks: dict[str, int]
    total: int
    largest: int


@dataclass
class TaskRssSampler:
    """Samples the process trees under ``roots`` every ``interval_s`` in a thread (use as a context manager)."""

    roots: list[int]
    interval_s: float = 0.1
    anonymous: bool = False  # RssAnon (/proc/<pid>/status) instead of RSS: file-backed pages (mmap) not counted
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="task-rss")
        self._started = 0.0

    def __enter__(self) -> TaskRssSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self.sample())

    def sample(self) -> Sample:
        """RSS now: per task instance (its process and descendants) and in total."""
        rss: dict[int, int] = {}
        titles: dict[int, str] = {}
        children: dict[int, list[int]] = {}
        spaces: dict[int, tuple[str, int]] = {}
        parents: dict[int, int] = {}
        for proc in process_tree(self.roots):
            try:
                memory = proc.memory_info()
                rss[proc.pid] = rss_anon(proc.pid) if self.anonymous else memory.rss
                titles[proc.pid] = " ".join(proc.cmdline())
                spaces[proc.pid] = (titles[proc.pid], memory.vms)
                parents[proc.pid] = proc.ppid()
                children.setdefault(proc.ppid(), []).append(proc.pid)
            except psutil.Error:
                continue
        for pid, parent in parents.items():
            # A child between vfork and exec runs in its parent's address space (same command line, same
            # virtual size): its pages are the parent's, counted once.
            if parent in spaces and spaces[pid] == spaces[parent]:
                rss[pid] = 0
        tasks: dict[str, int] = {}
        for pid, title in titles.items():
            match = TASK_TITLE.search(title)
            # The supervisor and the task process it forks share the title: count the tree once, from the top.
            if match and TASK_TITLE.search(titles.get(parents.get(pid, 0), "")) is None:
                tasks[match.group(1)] = tasks.get(match.group(1), 0) + _tree_rss(pid, rss, children)
        return Sample(time.monotonic() - self._started, tasks, sum(rss.values()), max(rss.values(), default=0))

    def peak_of(self, ti_ids: set[str]) -> int:
        """The largest sum, over one sample, of the RSS of the task instances in ``ti_ids`` (bytes)."""
        return max((sum(v for k, v in s.tasks.items() if k in ti_ids) for s in self.samples), default=0)

    def peak_per_task(self) -> dict[str, int]:
        """Each task instance's own peak (bytes)."""
        peaks: dict[str, int] = {}
        for sample in self.samples:
            for ti_id, value in sample.tasks.items():
                peaks[ti_id] = max(peaks.get(ti_id, 0), value)
        return peaks

    def peak_total(self) -> int:
        """The largest RSS of all sampled processes together (bytes)."""
        return max((s.total for s in self.samples), default=0)

    def peak_process(self) -> int:
        """The largest RSS of one process (bytes)."""
        return max((s.largest for s in self.samples), default=0)


def process_tree(roots: list[int]) -> list[psutil.Process]:
    """The processes ``roots`` and all their descendants (roots that are gone are left out)."""
    procs: list[psutil.Process] = []
    for root in roots:
        try:
            procs += [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.Error:
            continue
    return procs


def rss_anon(pid: int) -> int:
    """A process's anonymous resident memory in bytes (``RssAnon``); psutil.NoSuchProcess when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError as err:
        raise psutil.NoSuchProcess(pid) from err
    return 0


def _tree_rss(pid: int, rss: dict[int, int], children: dict[int, list[int]]) -> int:
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total


def max_concurrent(intervals: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals open at one moment."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best
