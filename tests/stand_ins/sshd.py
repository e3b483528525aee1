"""A real OpenSSH server on 127.0.0.1 for the tests: own host key, own client key, started and stopped here."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SSHServer:
    """A running sshd: where it listens and the keys that reach it."""

    port: int
    user: str
    client_key: Path
    host_key_line: str
    process: subprocess.Popen[bytes]
    log: Path

    def airflow_conn(self, **extra: object) -> str:
        """An ``AIRFLOW_CONN_<ID>`` value for this server, host key pinned, compression off."""
        return json.dumps({
            "conn_type": "ssh", "host": "127.0.0.1", "port": self.port, "login": self.user,
            "extra": {"key_file": str(self.client_key), "host_key": self.host_key_line, "compress": "false",
                      "look_for_keys": "false", **extra},
        })

    def stop(self) -> None:
        """Terminate sshd and wait for it."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_sshd(workdir: Path, timeout_s: float = 20) -> SSHServer:
    """Generate keys, write a config and start ``sshd -D`` on a free loopback port."""
    if not Path(SSHD).is_file() or shutil.which("ssh-keygen") is None:
        raise RuntimeError(f"{SSHD} is missing: scripts/test.sh installs openssh-server; run it once")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    for key in (host_key, client_key):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (workdir / "authorized_keys").write_text((client_key.with_suffix(".pub")).read_text())
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password",
        f"PidFile {workdir / 'sshd.pid'}", "Subsystem sftp internal-sftp", "",
    ]))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = workdir / "sshd.log"
    process = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port} within {timeout_s} s")
    key_type, key_data = host_key.with_suffix(".pub").read_text().split()[:2]
    return SSHServer(port=port, user=getpass.getuser(), client_key=client_key,
                     host_key_line=f"{key_type} {key_data}", process=process, log=log)
