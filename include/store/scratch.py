"""Scratch names: every temporary file or directory lora-deploy writes beside an output, and the sweep of dead ones.

All of them follow one scheme, ``.<final name>.<kind>-<token>`` in the final path's directory:

========  ==========================================================================================
kind      what it is
========  ==========================================================================================
tmp       the store's build directory of one key (``.<key>.tmp-<token>``); its ``out/`` becomes ``<key>``
merging   the merge's staging dir beside its output dir (in the store: inside the build directory)
part      a file or directory staged next to its final name (llama.cpp tool outputs, manifest.json)
trash     a directory renamed away to be deleted (its final name is free at once)
========  ==========================================================================================

The token (host, pid, random) only makes the name unique. Whether the writer is still alive is asked of a lock,
never of a PID (a PID means nothing on another Celery host sharing the volume): the writer holds an exclusive
``fcntl.flock`` on the scratch file itself, or on ``.lock`` inside a scratch directory, until the scratch was
renamed into place or removed. The kernel drops the lock when the process dies in any way (SIGKILL, the OOM
killer); on NFS the server's lock manager does. Code that deletes a scratch directory (``shutil.rmtree``) deletes
its lock with it, so nothing else needs cleaning. :func:`sweep` removes every scratch whose lock is free; a
directory without a lock (a trash, or a name of an older version) counts as dead once it is older than
:data:`LOCKLESS_GRACE_S`.

One more hidden name lives in the store, and it is not scratch: the download's resume cache
``.partial-<key>`` (:func:`resume_cache_name`) must outlive a failed attempt so a retry can resume; :func:`sweep`
removes it only once nothing touched it for ``stale_after_s``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("tmp", "merging", "part", "trash")
DIR_LOCK = ".lock"
RESUME_PREFIX = ".partial-"
SCRATCH = re.compile(r"^\.(?P<base>.+)\.(?P<kind>" + "|".join(KINDS) + r")-(?P<token>[A-Za-z0-9_-]+)$")
DEFAULT_STALE_S = 24 * 3600.0
LOCKLESS_GRACE_S = 60.0  # a scratch dir is created, then locked: give that instant (and clock skew) a margin

_held: dict[str, int] = {}  # scratch path -> fd holding its lock, for the scratch this process writes


def _forget_inherited() -> None:
    """In a forked child: the parent's scratch is not the child's (close the copies; the parent keeps its locks)."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_inherited)


@dataclass(frozen=True)
class Swept:
    """One hidden name the sweep removed (or, in a dry run, would remove)."""

    path: Path
    bytes: int
    reason: str


def token() -> str:
    """A unique token: ``<host>-<pid>-<random>`` (host and pid only help a human reading the name)."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:12] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def scratch_name(final_name: str, kind: str) -> str:
    """``.<final_name>.<kind>-<token>``: a new scratch name for an output called ``final_name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown scratch kind {kind!r}; use one of {KINDS}")
    return f".{final_name}.{kind}-{token()}"


def resume_cache_name(key: str) -> str:
    """The name of the download's resume cache of ``key`` (kept across attempts, removed when stale)."""
    return f"{RESUME_PREFIX}{key}"


def is_leftover_name(name: str) -> bool:
    """True for every hidden name lora-deploy writes beside outputs: scratch and resume caches."""
    return bool(SCRATCH.match(name)) or name.startswith(RESUME_PREFIX)


def claim(final: Path, kind: str, *, directory: bool = True) -> Path:
    """Create a new scratch beside ``final`` (an empty directory, or an empty file), locked by this process.

    Hand it back with :func:`finish` (rename onto its final name), :func:`release` (it was renamed or removed by
    other means) or :func:`discard` (delete it).
    """
    _close_forgotten()
    final = Path(final)
    path = final.parent / scratch_name(final.name, kind)
    if directory:
        path.mkdir()
        fd = os.open(path / DIR_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        _remove(path)
        raise
    _held[str(path)] = fd
    return path


def finish(path: Path, final: Path) -> None:
    """Rename the scratch ``path`` onto ``final`` (a directory loses its lock file on the way) and release it."""
    path, final = Path(path), Path(final)
    os.replace(path, final)
    if final.is_dir():
        (final / DIR_LOCK).unlink(missing_ok=True)
    release(path)


def release(path: Path) -> None:
    """Stop owning ``path`` (renamed into place or removed): drop its lock."""
    fd = _held.pop(str(path), None)
    if fd is None:
        return
    path = Path(path)
    if path.is_dir():
        (path / DIR_LOCK).unlink(missing_ok=True)
    os.close(fd)


def discard(path: Path) -> None:
    """Delete the scratch ``path`` if it still exists, and release it."""
    _remove(Path(path))
    release(path)


def owned(path: Path) -> bool:
    """True while this process writes the scratch ``path``."""
    return str(path) in _held


def trash(path: Path) -> int:
    """Delete the directory or file ``path``: rename it to a trash scratch (the name is free at once), then remove
    it. A kill half way leaves a lock-less trash that the next sweep removes. Returns the bytes freed."""
    path = Path(path)
    spot = path.parent / scratch_name(path.name, "trash")
    os.replace(path, spot)
    freed = freed_bytes(spot)
    _remove(spot)
    return freed


def _close_forgotten() -> None:
    """Close the locks of scratch that other code deleted without releasing it (``shutil.rmtree`` of a stage)."""
    for name, fd in list(_held.items()):
        if not os.path.lexists(name):
            _held.pop(name, None)
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file), each name counted."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size if path.exists() else 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def freed_bytes(path: Path) -> int:
    """Bytes that deleting ``path`` frees: files with no other hard link (an LM Studio install keeps its link)."""
    path = Path(path)
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    total = 0
    for item in files:
        try:
            info = item.stat()
        except OSError:
            continue
        total += info.st_size if info.st_nlink == 1 else 0
    return total


def owner_alive(path: Path, *, now: float | None = None) -> bool:
    """True while a process (on any host sharing the filesystem) holds the lock of the scratch ``path``."""
    path = Path(path)
    if owned(path):
        return True
    match = SCRATCH.match(path.name)
    lock = path / DIR_LOCK if path.is_dir() else path
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        if not path.exists() or (match and match["kind"] == "trash"):
            return False
        age = (time.time() if now is None else now) - path.stat().st_mtime
        return age < LOCKLESS_GRACE_S
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)
    return False


def newest_mtime(path: Path) -> float:
    """The latest modification time of ``path`` and the entries directly in it."""
    times = [path.stat().st_mtime]
    if path.is_dir():
        times += [p.stat().st_mtime for p in path.iterdir()]
    return max(times)


def sweep(directory: Path, *, kinds: tuple[str, ...] = KINDS, resume_caches: bool = False,
          stale_after_s: float = DEFAULT_STALE_S, dry_run: bool = False, now: float | None = None) -> list[Swept]:
    """Remove from ``directory`` every scratch of ``kinds`` whose writer is gone (and, with ``resume_caches``, the
    download resume caches untouched for ``stale_after_s``).

    Live writers (this process included) are left alone. ``dry_run`` only reports. Returns what was removed.
    """
    directory = Path(directory)
    now = time.time() if now is None else now
    stale_s = stale_after_s
    try:
        names = sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return []
    removed: list[Swept] = []
    for name in names:
        path = directory / name
        match = SCRATCH.match(name)
        try:
            if match and match["kind"] in kinds and not owner_alive(path, now=now):
                reason = f"{match['kind']} scratch of a writer that is gone"
            elif resume_caches and name.startswith(RESUME_PREFIX) and (age := now - newest_mtime(path)) >= stale_s:
                reason = f"download resume cache untouched for {age / 3600:.1f} h"
            else:
                continue
            removed.append(Swept(path, freed_bytes(path), reason))
        except FileNotFoundError:  # removed meanwhile by its writer or another sweep
            continue
        if not dry_run:
            log.info("removing %s: %s", path, removed[-1].reason)
            _remove(path)
    return removed
