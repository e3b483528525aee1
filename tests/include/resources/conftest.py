"""A memory-limited cgroup for the OOM tests: the kernel's OOM killer, for real, on a child process."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from include.resources.memory import memory_cgroup_dir


class LimitedCgroup:
    """A child memory cgroup of this process's (v1 ``memory.limit_in_bytes`` or v2 ``memory.max``)."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version

    def limit(self, limit_bytes: int | None) -> None:
        """Set the limit (None: no limit)."""
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        unlimited = "-1" if self.version == 1 else "max"
        value = unlimited if limit_bytes is None else str(limit_bytes)
        (self.path / name).write_text(value)

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the cgroup: a shell moves itself in, then execs it."""
        return ["sh", "-c", f'echo $$ > "{self.path}/cgroup.procs" && exec "$@"', "sh", *argv]


@pytest.fixture
def limited_cgroup() -> Iterator[LimitedCgroup]:
    """A memory cgroup limited to 96 MB below this process's, removed afterwards; skipped where none can be made."""
    found = memory_cgroup_dir()
    if found is None:
        pytest.skip("kernel OOM part skipped: no memory cgroup is mounted here (the decision logic is tested with "
                    "recorded counters in test_oom.py)")
    parent, version = found
    path = parent / f"lora-deploy-oom-test-{os.getpid()}"
    try:
        path.mkdir()
        cgroup = LimitedCgroup(path, version)
        cgroup.limit(96 * 1024 * 1024)
    except OSError as err:
        with contextlib.suppress(OSError):
            path.rmdir()
        pytest.skip(f"kernel OOM part skipped: cannot create a memory cgroup under {parent} ({err}); the decision "
                    "logic is tested with recorded counters in test_oom.py")
    try:
        yield cgroup
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
