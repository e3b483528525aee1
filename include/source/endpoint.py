"""How to reach a training box over SSH: one endpoint description, a paramiko client and an ``ssh`` command line.

Host keys are checked by default: against a key pinned in the connection (``host_key``) or else the
user's ``known_hosts``. Only ``verify_host_key=False`` (set explicitly in config) turns that off. The
private key travels as a file path; a key given inline is written to a private temp file (mode 0600)
that lives only as long as the command, so no secret is ever on a command line or in a log.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import shlex
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from include.errors import SourceError, TransientSourceError

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

# Fast AEAD ciphers first (AES-GCM is fast with AES-NI; see docs/benchmarks.md); the server picks from the list.
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr"


@dataclass(frozen=True)
class SSHEndpoint:
    """Where and how to log in: host, port, user, key (file or inline) and how the host key is checked."""

    host: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    private_key: str | None = field(default=None, repr=False)
    host_key: str | None = None
    verify_host_key: bool = True
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout_s: float = 30

    @property
    def known_hosts_name(self) -> str:
        """The host as known_hosts spells it (``[host]:port`` unless the port is 22)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def description(self) -> str:
        """``user@host:port`` for messages."""
        return f"{self.user}@{self.host}:{self.port}"


def _pinned_key(line: str) -> tuple[str, str]:
    parts = line.split()
    if len(parts) >= 3 and not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        parts = parts[1:]  # a known_hosts line: "host keytype data"
    if len(parts) < 2:
        raise SourceError(f"the pinned host key {line[:40]!r} is not 'keytype base64-data'",
                          fix="copy it from `ssh-keyscan -p PORT HOST` (e.g. 'ssh-ed25519 AAAA...')")
    try:
        base64.b64decode(parts[1], validate=True)
    except binascii.Error as err:
        raise SourceError("the pinned host key is not valid base64", fix="copy it again from ssh-keyscan") from err
    return parts[0], parts[1]


def connect(endpoint: SSHEndpoint) -> paramiko.SSHClient:
    """An authenticated paramiko client; the host key must match the pinned one or known_hosts (unless turned off)."""
    import paramiko

    client = paramiko.SSHClient()
    if endpoint.verify_host_key:
        if endpoint.host_key:
            key_type, data = _pinned_key(endpoint.host_key)
            client.get_host_keys().add(endpoint.known_hosts_name, key_type,
                                       paramiko.PKey.from_type_string(key_type, base64.b64decode(data)))
        else:
            known = Path(endpoint.known_hosts).expanduser()
            if known.is_file():
                client.load_host_keys(str(known))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        log.warning("host key checking is OFF for %s (verify_host_key: false in the config)", endpoint.description)
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    pkey = _load_inline_key(endpoint.private_key) if endpoint.private_key else None
    with ssh_errors(endpoint.description, endpoint.known_hosts):
        client.connect(endpoint.host, port=endpoint.port, username=endpoint.user, pkey=pkey,
                       key_filename=os.path.expanduser(endpoint.key_file) if endpoint.key_file else None,
                       look_for_keys=not (pkey or endpoint.key_file), allow_agent=False, compress=False,
                       timeout=endpoint.connect_timeout_s, banner_timeout=endpoint.connect_timeout_s,
                       auth_timeout=endpoint.connect_timeout_s)
    tcp_nodelay(client)
    return client


@contextmanager
def ssh_errors(description: str, known_hosts: str = "~/.ssh/known_hosts") -> Iterator[None]:
    """Turn paramiko's connection failures into engine errors: a wrong or unknown host key and a refused key are
    :class:`SourceError` (a retry cannot fix them), anything else on the way :class:`TransientSourceError`."""
    import paramiko

    try:
        yield
    except paramiko.BadHostKeyException as err:
        raise SourceError(f"the host key of {description} does not match the expected one",
                          fix="if the box was re-created, update the connection's host_key (ssh-keyscan); otherwise "
                              "someone may be in the middle") from err
    except paramiko.SSHException as err:
        if "not found in known_hosts" in str(err) or ("Server " in str(err) and "not found" in str(err)):
            raise SourceError(f"the host key of {description} is unknown (not pinned, not in {known_hosts})",
                              fix="pin it in the connection extra host_key (from `ssh-keyscan -p PORT HOST`), or "
                                  "set verify_host_key: false in the model's source config to skip the check "
                                  "knowingly") from err
        if isinstance(err, paramiko.AuthenticationException):
            raise SourceError(f"{description} refused the SSH key",
                              fix="check the connection's login and key_file and the box's authorized_keys") from err
        raise TransientSourceError(f"SSH to {description} failed: {err}",
                                   fix="the task retries; check the box is up") from err
    except OSError as err:
        raise TransientSourceError(f"cannot reach {description}: {err}",
                                   fix="the task retries; check the box is up and the port is right") from err


def tcp_nodelay(client: paramiko.SSHClient) -> None:
    """Turn Nagle off on the client's socket: pipelined SFTP reads stall on Nagle + delayed ACKs (40 ms a round)."""
    transport = client.get_transport()
    sock = getattr(transport, "sock", None)
    if isinstance(sock, socket.socket):  # not a ProxyCommand
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _load_inline_key(text: str) -> paramiko.PKey:
    import io

    import paramiko

    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    # Never echo the key itself.
    raise SourceError("the connection's inline private_key could not be read",
                      fix="store an unencrypted OpenSSH/PEM key, or use key_file")


@contextmanager
def ssh_command(endpoint: SSHEndpoint) -> Iterator[list[str]]:
    """``ssh`` argv (without the destination) for rsync's ``-e``: strict host key check, batch mode, no secrets.

    A pinned host key goes into a temp known_hosts file; an inline private key into a temp 0600 file.
    Both are removed when the block ends.
    """
    with tempfile.TemporaryDirectory(prefix="lora-deploy-ssh-") as tmp:
        os.chmod(tmp, 0o700)
        argv = ["ssh", "-p", str(endpoint.port), "-l", endpoint.user, "-o", "BatchMode=yes", "-o", "Compression=no",
                "-o", f"Ciphers={CIPHERS}", "-o", f"ConnectTimeout={int(endpoint.connect_timeout_s)}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR",
                "-o", "IdentitiesOnly=yes", "-F", "/dev/null"]
        if endpoint.verify_host_key:
            if endpoint.host_key:
                key_type, data = _pinned_key(endpoint.host_key)
                known = Path(tmp) / "known_hosts"
                known.write_text(f"{endpoint.known_hosts_name} {key_type} {data}\n")
            else:
                known = Path(endpoint.known_hosts).expanduser()
            argv += ["-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes"]
        else:
            argv += ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"]
        if endpoint.private_key:
            key_path = Path(tmp) / "id"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(endpoint.private_key.rstrip("\n") + "\n")
            argv += ["-i", str(key_path)]
        elif endpoint.key_file:
            argv += ["-i", os.path.expanduser(endpoint.key_file)]
        yield argv


def rsync_shell(argv: list[str]) -> str:
    """The ``-e`` value for rsync (it splits on spaces and honours quotes)."""
    return " ".join(shlex.quote(a) for a in argv)
