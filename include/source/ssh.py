"""Checkpoints on a training box over SSH: listed over SFTP, hashed on the box, fetched with rsync or SFTP."""

from __future__ import annotations

import fnmatch
import logging
import shlex
import stat
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from include.errors import SourceError, TransientSourceError
from include.source.endpoint import SSHEndpoint
from include.source.transfer import local_rsync, rsync_fetch, sftp_fetch
from include.source.types import Checkpoint, SourceFile, TransferResult, check_name, wanted

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

_RSYNC_MARK = "#lora-deploy:rsync"


TransferMethod = Literal["auto", "rsync", "sftp"]


class SSHSource:
    """Checkpoints on a remote box, through an open paramiko client whose host key the caller has checked.

    ``endpoint`` (how to reach the box again with ``ssh``) enables rsync; ``method`` ``auto`` uses rsync
    when both ends have it, else SFTP.
    """

    def __init__(self, client: paramiko.SSHClient, remote_dir: str, checkpoint_glob: str = "checkpoint-*",
                 description: str = "", *, endpoint: SSHEndpoint | None = None, method: TransferMethod = "auto",
                 progress_interval_s: float | None = None) -> None:
        self.client = client
        self.remote_dir = PurePosixPath(remote_dir)
        self.checkpoint_glob = checkpoint_glob
        self.description = description or f"remote directory {str(self.remote_dir)!r}"
        self.endpoint = endpoint
        self.method = method
        self.progress_interval_s = progress_interval_s
        self._sftp: paramiko.SFTPClient | None = None
        self._remote_rsync: bool | None = None
    @property
    def sftp(self) -> paramiko.SFTPClient:
        """One SFTP session for the life of this source."""
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def list_checkpoints(self) -> list[Checkpoint]:
        """Checkpoint directories matching the glob (listed over SFTP: no shell involved)."""
        try:
            entries = self.sftp.listdir_attr(str(self.remote_dir))
        except FileNotFoundError as err:
            raise SourceError(f"{self.description} does not exist on the training box",
                              fix="check source.remote_dir and that training wrote its checkpoints there") from err
        return [Checkpoint(e.filename, float(e.st_mtime or 0)) for e in entries
                if stat.S_ISDIR(e.st_mode or 0) and fnmatch.fnmatchcase(e.filename, self.checkpoint_glob)]

    def list_files(self, checkpoint: str) -> list[SourceFile]:
        """The wanted files of a checkpoint with sizes, and sha256 computed on the box (openssl, else sha256sum)."""
        directory = self.remote_dir / check_name(checkpoint, "checkpoint")
        entries = [e for e in self.sftp.listdir_attr(str(directory))
                   if stat.S_ISREG(e.st_mode or 0) and wanted(e.filename)]
        if not entries:
            return []
        names = [check_name(e.filename, "file") for e in entries]
        hashes = self._remote_sha256(directory, names)
        return [SourceFile(e.filename, int(e.st_size or 0), hashes[e.filename]) for e in entries]

    def _remote_sha256(self, directory: PurePosixPath, names: list[str]) -> dict[str, str]:
        # One round trip: also note whether the box has rsync (for choose_method). OpenSSL's sha256 uses the
        # CPU's SHA extensions (~4x coreutils' sha256sum); names passed check_name(), so none starts with '-'.
        command = (f"if command -v rsync >/dev/null 2>&1; then echo '{_RSYNC_MARK}'; fi; "
                   "if command -v openssl >/dev/null 2>&1; then H='openssl dgst -sha256 -r'; else H=sha256sum; fi; "
                   f"cd {shlex.quote(str(directory))} && $H " + " ".join(shlex.quote(n) for n in names))
        _, stdout, stderr = self.client.exec_command(command, timeout=3600)
        output = stdout.read().decode()
        status = stdout.channel.recv_exit_status()
        if status != 0:
            raise SourceError(f"hashing failed on the training box (exit {status}): {stderr.read().decode()[-300:]}",
                              fix="make sure openssl or coreutils' sha256sum exists there and the files are readable")
        hashes = {}
        for line in output.splitlines():
            if line == _RSYNC_MARK:
                self._remote_rsync = True
                continue
            digest, _, name = line.partition(" ")  # "<hex>  name" (sha256sum) or "<hex> *name" (openssl -r)
            hashes[name.lstrip(" *")] = digest.lower()
        return hashes

    def fetch(self, checkpoint: str, files: list[SourceFile], dest: Path) -> TransferResult:
        """Bring the files into ``dest``, resuming partial files there (rsync or SFTP, see ``method``)."""
        directory = self.remote_dir / check_name(checkpoint, "checkpoint")
        for item in files:
            check_name(item.name, "file")
        if self.choose_method() == "rsync":
            assert self.endpoint is not None  # choose_method() checked it
            return rsync_fetch(self.endpoint, directory, files, dest, progress_interval_s=self.progress_interval_s)
        return sftp_fetch(self.sftp, directory, files, dest, progress_interval_s=self.progress_interval_s)

    def choose_method(self) -> Literal["rsync", "sftp"]:
        """rsync when asked or when ``auto`` finds it on both ends (and an endpoint to run ssh with), else sftp."""
        if self.method == "sftp":
            return "sftp"
        usable = self.endpoint is not None and local_rsync() is not None and self._remote_has("rsync")
        if self.method == "rsync" and not usable:
            raise SourceError("transfer method 'rsync' needs rsync on this machine and on the box",
                              fix="install rsync on both, or set source.transfer to 'auto' or 'sftp'")
        if not usable:
            log.info("rsync is not available on both ends: using SFTP")
        return "rsync" if usable else "sftp"

    def _remote_has(self, program: str) -> bool:
        if program == "rsync" and self._remote_rsync is not None:
            return self._remote_rsync
        try:
            _, stdout, _ = self.client.exec_command(f"command -v {shlex.quote(program)}", timeout=60)
            stdout.read()
            return stdout.channel.recv_exit_status() == 0
        except (OSError, EOFError) as err:
            raise TransientSourceError(f"lost the SSH session to {self.description}: {err}",
                                       fix="the task retries") from err

    def close(self) -> None:
        """Close the SFTP session (the SSH client belongs to the caller)."""
        if self._sftp is not None:
            sftp, self._sftp = self._sftp, None
            try:
                sftp.close()
            except Exception as err:  # a dropped link fails the close too; the real error is already raised
                log.debug("closing the SFTP session failed: %r", err)
