"""Attempt records: how the next try of a stage learns that the previous one was killed by the OOM killer.

When the kernel kills the task process itself (work done in-process: the fidelity gate, the streaming merge),
nothing of it runs any more to say why; Airflow only sees the process gone and retries, and the retry would run
out of memory the same way. So a guarded stage writes a small record when it starts (pid and its start time,
host, boot id, the OOM-kill counters, the estimate, the memory it had) and removes it when it ends, however it
ends. A record found at the start of the next try means that try's process died without cleaning up; it was the
OOM killer when the process is gone, the host and boot are the same and the counter rose since the record was
written. Anything else (a user's ``kill -9``, a lost worker, another host) is not judged: the try runs normally.
A verdict is given once: the record is removed when read, so clearing the task after freeing memory runs it.

Records live on the worker's own disk (:func:`default_directory`, under the temp dir), not in the artifact store:
only a try on the same host can judge them, and a reboot, which resets the counters, clears them with ``/tmp``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from include.resources.memory import boot_id, hostname
from include.resources.oom import OomCounters, oom_kills_between
from include.resources.sampler import alive, start_time

log = logging.getLogger(__name__)

MAX_AGE_S = 14 * 24 * 3600.0  # records older than this (a try that never came) are swept
DIRECTORY_ENV = "LORA_DEPLOY_ATTEMPTS_DIR"


def default_directory() -> Path:
    """This host's attempt records: ``$LORA_DEPLOY_ATTEMPTS_DIR``, else ``<tmp>/lora-deploy-attempts-<uid>``."""
    return Path(os.environ.get(DIRECTORY_ENV) or Path(tempfile.gettempdir()) / f"lora-deploy-attempts-{os.getuid()}")


@dataclass
class Attempt:
    """One try of a stage, as recorded when it started (``peak_bytes`` is refreshed while it runs)."""

    key: str
    stage: str
    estimate_bytes: int
    memory: str
    counters: OomCounters
    pid: int = field(default_factory=os.getpid)
    pid_start: int | None = field(default_factory=lambda: start_time(os.getpid()))
    host: str = field(default_factory=hostname)
    boot: str | None = field(default_factory=boot_id)
    started_at: float = field(default_factory=time.time)
    peak_bytes: int = 0

    def as_record(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {"key": self.key, "stage": self.stage, "estimate_bytes": self.estimate_bytes, "memory": self.memory,
                "counters": self.counters.as_record(), "pid": self.pid, "pid_start": self.pid_start,
                "host": self.host, "boot": self.boot, "started_at": self.started_at, "peak_bytes": self.peak_bytes}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Attempt:
        """Back from :meth:`as_record` (KeyError/TypeError/ValueError on a malformed record)."""
        return cls(key=str(record["key"]), stage=str(record["stage"]), estimate_bytes=int(record["estimate_bytes"]),
                   memory=str(record["memory"]), counters=OomCounters.from_record(dict(record["counters"])),
                   pid=int(record["pid"]), pid_start=record.get("pid_start"), host=str(record["host"]),
                   boot=record.get("boot"), started_at=float(record["started_at"]),
                   peak_bytes=int(record.get("peak_bytes") or 0))


def record_path(directory: Path, key: str) -> Path:
    """Where the record of ``key`` (a task instance: dag, run, task, map index) lives."""
    return Path(directory) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def write(directory: Path, attempt: Attempt) -> Path:
    """Write (or refresh) ``attempt``'s record atomically; returns its path."""
    path = record_path(directory, attempt.key)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(attempt.as_record()))
    os.replace(tmp, path)
    return path


def sweep(directory: Path, max_age_s: float = MAX_AGE_S) -> None:
    """Remove records (and temp files) older than ``max_age_s``."""
    cutoff = time.time() - max_age_s
    for path in Path(directory).glob("*.json*") if Path(directory).is_dir() else ():
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def take(directory: Path, key: str) -> Attempt | None:
    """The record a previous try of ``key`` left behind (removed as it is read), or None."""
    path = record_path(directory, key)
    try:
        text = path.read_text()
    except OSError:
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    try:
        attempt = Attempt.from_record(json.loads(text))
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the unreadable attempt record %s: %s", path, err)
        return None
    return attempt if attempt.key == key else None


def oom_kills_since(previous: Attempt, now: OomCounters) -> int | None:
    """OOM kills counted since ``previous`` started, when they can be judged (else None): same host and boot,
    its process gone, a comparable counter."""
    if previous.host != hostname() or previous.boot != boot_id():
        log.info("the previous try of %s ran on %s (boot %s): its end cannot be judged here", previous.stage,
                 previous.host, previous.boot)
        return None
    if alive(previous.pid, previous.pid_start):
        log.warning("the previous try of %s (pid %d) is still running", previous.stage, previous.pid)
        return None
    return oom_kills_between(previous.counters, now)


def finish(directory: Path, key: str) -> None:
    """Remove the record of ``key``: the try ended (success or an error it reported itself)."""
    with contextlib.suppress(OSError):
        record_path(directory, key).unlink()
