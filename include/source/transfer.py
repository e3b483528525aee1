"""Moving checkpoint files from the box into a staging directory: resumable, hashed on arrival, with progress.

Two ways, both resuming from whatever the staging directory already holds:

- ``rsync --partial --append-verify`` over ``ssh`` when both ends have rsync: a partial file is kept
  in place and only its missing tail is sent; rsync re-sends a file whose whole-file checksum fails.
- SFTP (paramiko) otherwise: the read starts at the local partial size, with prefetch on and compression off.

While bytes arrive they are hashed (a :class:`TailHasher` follows each file as it grows), so verification
against the sha256 the box announced costs almost nothing after the last byte. Progress lines (percent,
MB/s, ETA) go to the log every few seconds, never per chunk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from include.errors import SourceError, TransientSourceError
from include.source.endpoint import SSHEndpoint, rsync_shell, ssh_command
from include.source.types import SourceFile, TransferResult
from include.store.hashing import sha256_file
from include.units import format_bytes

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 5.0
_READ = 1 << 20


class Progress:
    """Logs ``percent, MB/s, ETA`` at most every ``interval_s`` seconds."""

    def __init__(self, total: int, what: str, *, already: int = 0, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = max(total, 1)
        self.what = what
        self.already = already
        self.interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s
        self._clock = clock
        self._start = self._last = clock()
        self.done = already

    def update(self, done: int) -> None:
        """Record the bytes present so far; log a line when the interval has passed."""
        self.done = done
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """One progress line."""
        elapsed = max((now or self._clock()) - self._start, 1e-6)
        rate = max(self.done - self.already, 0) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        return (f"{self.what}: {100 * self.done / self.total:5.1f}% of {self.total / 1e6:.1f} MB, "
                f"{rate / 1e6:.1f} MB/s, ETA {eta_text}")

    def finish(self) -> None:
        """Log the final line."""
        log.info("%s", self.line())


class TailHasher:
    """sha256 of a file that grows by appending, read as it grows (falls back to a full read if it was rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._digest = hashlib.sha256()

    def feed(self, size: int | None = None) -> None:
        """Hash the bytes between the last position and ``size`` (default: the file's current size)."""
        try:
            size = self.path.stat().st_size if size is None else size
            if size <= self.offset:
                return
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                while self.offset < size:
                    block = handle.read(min(_READ * 8, size - self.offset))
                    if not block:
                        break
                    self._digest.update(block)
                    self.offset += len(block)
        except FileNotFoundError:
            return

    def update(self, data: bytes) -> None:
        """Hash bytes the caller is appending itself."""
        self._digest.update(data)
        self.offset += len(data)

    def hexdigest(self, expected: str) -> str:
        """The final digest; re-hashes the whole file when it does not match (it may have been rewritten)."""
        self.feed()
        digest = self._digest.hexdigest()
        if digest != expected and self.path.exists():
            digest = sha256_file(self.path)
        return digest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def local_rsync() -> str | None:
    """The local rsync binary, if any."""
    return shutil.which("rsync")


def rsync_fetch(endpoint: SSHEndpoint, remote_dir: PurePosixPath, files: list[SourceFile], staging: Path,
                *, progress_interval_s: float | None = None) -> TransferResult:
    """Pull ``files`` from ``remote_dir`` with ``rsync --partial --append-verify``; hash them as they land."""
    names = [f.name for f in files]
    paths = {name: staging / name for name in names}
    resumed = sum(min(_size(p), f.bytes) for p, f in zip(paths.values(), files, strict=True))
    hashers = {name: TailHasher(path) for name, path in paths.items()}
    total = sum(f.bytes for f in files)
    progress = Progress(total, f"rsync {len(files)} file(s)", already=resumed, interval_s=progress_interval_s)
    poll = min(1.0, progress.interval_s or 1.0)
    with ssh_command(endpoint) as argv, tempfile.NamedTemporaryFile("w", prefix="lora-deploy-files-") as listing:
        listing.write("\n".join(names) + "\n")
        listing.flush()
        command = ["rsync", "--verbose", "--partial", "--append-verify", "--stats", "--no-motd",
                   f"--files-from={listing.name}", "-e", rsync_shell(argv), f"{endpoint.host}:{remote_dir}/",
                   f"{staging}/"]
        log.info("rsync from %s:%s (%d files, %s, %s already here)", endpoint.description, remote_dir,
                 len(files), format_bytes(total), format_bytes(resumed))
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            try:
                while True:
                    try:
                        process.wait(timeout=poll)
                        break
                    except subprocess.TimeoutExpired:
                        for hasher in hashers.values():
                            hasher.feed()
                        progress.update(sum(_size(p) for p in paths.values()))
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    progress.update(sum(_size(p) for p in paths.values()))
    progress.finish()
    for line in (stdout + stderr).splitlines():
        if "failed verification" in line:
            log.warning("rsync: %s: the resumed file did not match, rsync repaired it (delta transfer)",
                        line.strip())
    if process.returncode != 0:
        _raise_rsync(process.returncode, stderr, endpoint)
    received = _stat(stdout, "Total bytes received")
    hashes = {f.name: hashers[f.name].hexdigest(f.sha256) for f in files}
    return TransferResult("rsync", received_bytes=received, resumed_bytes=resumed, hashes=hashes)


def _stat(output: str, label: str) -> int:
    match = re.search(rf"{label}: ([\d,.]+)", output)
    return int(re.sub(r"[,.]", "", match.group(1))) if match else 0


def _raise_rsync(code: int, stderr: str, endpoint: SSHEndpoint) -> None:
    tail = stderr.strip()[-400:]
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        raise SourceError(f"ssh refused the host key of {endpoint.description} (rsync exit {code}): {tail}",
                          fix="pin the right key in the connection extra host_key (ssh-keyscan), or set "
                              "verify_host_key: false in the source config to skip the check knowingly")
    if "Permission denied (publickey" in stderr:
        raise SourceError(f"{endpoint.description} refused the SSH key: {tail}",
                          fix="check the connection's login and key_file and the box's authorized_keys")
    raise TransientSourceError(f"rsync from {endpoint.description} stopped (exit {code}): {tail}",
                               fix="the task retries and resumes from the partial files")


def sftp_fetch(sftp: paramiko.SFTPClient, remote_dir: PurePosixPath, files: list[SourceFile], staging: Path,
               *, progress_interval_s: float | None = None) -> TransferResult:
    """Read ``files`` over SFTP, each from the local partial size on, prefetching; hash while writing."""
    paths = [staging / f.name for f in files]
    resumed = sum(min(_size(p), f.bytes) for p, f in zip(paths, files, strict=True))
    total = sum(f.bytes for f in files)
    progress = Progress(total, f"sftp {len(files)} file(s)", already=resumed, interval_s=progress_interval_s)
    result = TransferResult("sftp", resumed_bytes=resumed)
    done = resumed
    log.info("sftp from %s (%d files, %s, %s already here)", remote_dir, len(files), format_bytes(total),
             format_bytes(resumed))
    for item, path in zip(files, paths, strict=True):
        offset = _size(path)
        if offset > item.bytes:
            path.unlink()
            done -= item.bytes
            offset = 0
        hasher = TailHasher(path)
        hasher.feed(offset)
        try:
            with sftp.open(str(remote_dir / item.name), "rb") as source, path.open("ab") as target:
                source.seek(offset)
                if offset < item.bytes:
                    source.prefetch(item.bytes)
                position = offset
                while position < item.bytes:
                    data = source.read(min(_READ, item.bytes - position))
                    if not data:
                        break
                    target.write(data)
                    hasher.update(data)
                    position += len(data)
                    result.received_bytes += len(data)
                    done += len(data)
                    progress.update(done)
                target.flush()
                os.fsync(target.fileno())
        except (OSError, EOFError, _ssh_exception()) as err:
            if isinstance(err, FileNotFoundError) and not path.exists():
                raise
            raise TransientSourceError(f"SFTP read of {item.name} stopped at {_size(path)} of {item.bytes} bytes: "
                                       f"{err or type(err).__name__}",
                                       fix="the task retries and resumes from the partial file") from err
        result.hashes[item.name] = hasher.hexdigest(item.sha256)
    progress.finish()
    return result


def _ssh_exception() -> type[Exception]:
    import paramiko

    return paramiko.SSHException


def copy_fetch(root: Path, files: list[SourceFile], staging: Path) -> TransferResult:
    """Copy local files (a mounted volume) into staging; no resume needed on one machine."""
    result = TransferResult("copy")
    for item in files:
        shutil.copyfile(root / item.name, staging / item.name)
        result.received_bytes += item.bytes
        result.hashes[item.name] = sha256_file(staging / item.name)
    return result


def summary(result: TransferResult, seconds: float) -> dict[str, Any]:
    """The transfer figures for the XCom record."""
    return {"method": result.method, "received_bytes": result.received_bytes, "resumed_bytes": result.resumed_bytes,
            "seconds": round(seconds, 3)}
