"""How much memory a stage may use on this worker: MemAvailable, capped by the memory cgroup and a budget.

- ``MemAvailable`` (``/proc/meminfo``) is the kernel's estimate of what can be allocated without swapping:
  free memory plus the page cache it can drop.
- A memory cgroup (a container, a systemd slice) may allow less than the machine has: its limit is the smallest
  ``memory.limit_in_bytes`` (v1) or ``memory.max`` (v2) of the process's cgroup and its ancestors, and what is
  left of it is that limit minus the anonymous memory the cgroup already holds (its page cache is reclaimable).
- ``workers.memory_budget_mb`` caps both, for users who share a worker with other work and for tests.

Linux only; elsewhere every probe answers None and only the budget (if any) applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MB = 1_000_000
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Limits at or above this are "no limit" (v1 writes 2^63 rounded down to a page; v2 writes "max").
UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Cgroup:
    """The memory cgroup of a process: its directory, its version, its effective limit and anonymous usage."""

    path: Path
    version: int
    limit: int | None  # bytes; None: no limit on the way up
    anon: int | None  # anonymous bytes the cgroup (with its descendants) holds now

    @property
    def available(self) -> int | None:
        """What the limit leaves (None without a limit)."""
        if self.limit is None:
            return None
        return max(0, self.limit - (self.anon or 0))


@dataclass(frozen=True)
class WorkerMemory:
    """What a stage starting now may allocate (:attr:`available`: the smallest of MemAvailable, the cgroup's rest and
    the budget) and what it could allocate on this worker with nothing else running (:attr:`capacity`: the smallest
    of MemTotal, the cgroup's limit and the budget)."""

    mem_available: int | None
    cgroup_limit: int | None = None
    cgroup_available: int | None = None
    budget: int | None = None
    mem_total: int | None = None

    @property
    def available(self) -> int | None:
        """Bytes a stage may still allocate (None when nothing is known: no /proc, no budget)."""
        bounds = [b for b in (self.mem_available, self.cgroup_available, self.budget) if b is not None]
        return min(bounds) if bounds else None

    @property
    def capacity(self) -> int | None:
        """Bytes a stage could allocate here once other work ended (None when nothing is known)."""
        bounds = [b for b in (self.mem_total, self.cgroup_limit, self.budget) if b is not None]
        return min(bounds) if bounds else None

    @property
    def bound_by(self) -> str:
        """Which bound applies: ``budget``, ``cgroup`` or ``MemAvailable``."""
        available = self.available
        if available is not None and available == self.budget:
            return "budget"
        if available is not None and available == self.cgroup_available:
            return "cgroup"
        return "MemAvailable"

    def describe(self) -> str:
        """One line: the applicable figure and where it comes from."""
        if self.available is None:
            return "unknown (no /proc/meminfo)"
        parts = [f"MemAvailable {_mb(self.mem_available)}"]
        if self.cgroup_limit is not None:
            parts.append(f"cgroup limit {_mb(self.cgroup_limit)} with {_mb(self.cgroup_available)} left")
        if self.budget is not None:
            parts.append(f"budget workers.memory_budget_mb={self.budget // MB}")
        return f"{_mb(self.available)} ({'; '.join(parts)})"

    def as_record(self) -> dict[str, int | str | None]:
        """JSON-safe figures (bytes)."""
        return {"available": self.available, "capacity": self.capacity, "bound_by": self.bound_by,
                "mem_available": self.mem_available, "mem_total": self.mem_total, "cgroup_limit": self.cgroup_limit,
                "cgroup_available": self.cgroup_available, "budget": self.budget, "text": self.describe()}


def _mb(value: int | None) -> str:
    return "?" if value is None else f"{value / MB:,.0f} MB"


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (empty when unreadable)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _stat_value(path: Path, *names: str) -> int | None:
    """The first of ``names`` found in a cgroup ``memory.stat`` file."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    values = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
    for name in names:
        if name in values and values[name].isdigit():
            return int(values[name])
    return None


def memory_cgroup_dir(pid: int | str = "self") -> tuple[Path, int] | None:
    """``(directory, version)`` of the memory cgroup of ``pid`` (v1's memory controller, else v2), if mounted."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = CGROUP_ROOT / "memory" / path.lstrip("/")
            if directory.is_dir():
                return directory, 1
        if controllers == "":
            unified = path
    if unified is not None:
        directory = CGROUP_ROOT / unified.lstrip("/")
        if (directory / "memory.max").is_file() or (directory / "memory.stat").is_file():
            return directory, 2
    return None


def cgroup_memory(pid: int | str = "self") -> Cgroup | None:
    """The memory cgroup of ``pid`` with its effective limit (smallest up to the root) and anonymous usage."""
    found = memory_cgroup_dir(pid)
    if found is None:
        return None
    directory, version = found
    top = CGROUP_ROOT / "memory" if version == 1 else CGROUP_ROOT
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    limits = []
    probe = directory
    while True:
        value = _read_int(probe / limit_file)
        if value is not None:
            limits.append(value)
        if probe == top or probe == probe.parent:
            break
        probe = probe.parent
    stat = directory / "memory.stat"
    anon = _stat_value(stat, "total_rss", "rss") if version == 1 else _stat_value(stat, "anon")
    return Cgroup(directory, version, min(limits) if limits else None, anon)


def worker_memory(budget_mb: int | None = None) -> WorkerMemory:
    """What this worker has for a stage now (``budget_mb``: ``workers.memory_budget_mb``)."""
    cgroup = cgroup_memory()
    info = meminfo()
    total = info.get("MemTotal")
    limit = cgroup.limit if cgroup is not None else None
    if limit is not None and total is not None and limit >= total:
        limit = None  # a limit above the machine's RAM limits nothing
    return WorkerMemory(mem_available=info.get("MemAvailable"), cgroup_limit=limit,
                        cgroup_available=cgroup.available if cgroup is not None and limit is not None else None,
                        budget=budget_mb * MB if budget_mb is not None else None, mem_total=total)


def hostname() -> str:
    """This machine's name (attempt records compare it)."""
    return os.uname().nodename


def boot_id() -> str | None:
    """The kernel's boot id: counters and pids of another boot mean nothing."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
