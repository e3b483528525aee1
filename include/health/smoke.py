"""The smoke check of a GGUF before promotion: an ephemeral llama.cpp server, file checks, free resources.

- :func:`serve_gguf` serves a GGUF with ``python -m include.cli.serve`` (``llama_cpp.server`` with llama.cpp's CPU
  weight repacking off, so a quantized model's weights stay file-backed instead of taking anonymous memory the
  size of the model) on a free loopback port, waits until it answers ``GET /v1/models`` (polled through the
  engine's retry policy, noticing at once a server that exits) and always stops the server's whole process group.
- :func:`smoke_test` serves a GGUF and runs :func:`~include.health.endpoint.check_endpoint` against it.
- :func:`check_gguf_file` checks an installed file: size, sha256 against the record, GGUF magic and version.
- :func:`resources` reports free disk and memory for the health report.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from include.errors import HealthError
from include.health.endpoint import REQUEST_ERRORS, check, check_endpoint, client, describe, request_json
from include.retry import RetryPolicy

log = logging.getLogger(__name__)

POLL_S = 0.2
READY_TIMEOUT_S = 2.0
STOP_GRACE_S = 10.0
TAIL_LINES = 30
GGUF_VERSIONS = (2, 3)
SERVER_MODULE = "include.cli.serve"
ENGINE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the ``include`` package
# llama_cpp.server reads these over its command line (the listen address and port, a whole config file)
OVERRIDING_ENV = ("HOST", "PORT", "CONFIG_FILE")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server output)"
    return "\n".join(lines[-TAIL_LINES:]) or "(no server output)"


def _server_env() -> dict[str, str]:
    """The server's environment: this process's, without the variables that would override its command line.

    The server imports ``include.cli.serve`` from this engine's tree: when that tree is not on ``sys.path`` (an
    editable install resolves it through an import hook), it goes first on the server's PYTHONPATH.
    """
    env = {name: value for name, value in os.environ.items() if name not in OVERRIDING_ENV}
    if str(ENGINE_ROOT) not in {str(Path(entry or ".").resolve()) for entry in sys.path}:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ENGINE_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group; kill it if it does not exit within STOP_GRACE_S."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            log.warning("llama_cpp.server pid %d ignored %s", proc.pid, sig.name)


@contextmanager
def serve_gguf(gguf_path: Path, *, model_id: str, startup_timeout_s: float = 120, python: str = sys.executable,
               n_ctx: int | None = None, server_module: str = SERVER_MODULE) -> Iterator[str]:
    """Serve ``gguf_path`` with ``python -m include.cli.serve`` on a free loopback port; yield its base URL.

    ``server_module`` is the module run with ``python -m``: the default keeps the weights in the mmap-ed file;
    ``"llama_cpp.server"`` is the plain server (llama.cpp's defaults: quantized weights repacked into anonymous
    memory on AVX2 CPUs). The server runs in its own process group, which is always stopped on exit (also on
    errors). HealthError with the tail of the server output if it exits or is not ready by the deadline.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise HealthError(f"GGUF {str(gguf_path)!r} does not exist", model=model_id,
                          fix="run the quantize stage first")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [python, "-m", server_module, "--model", str(gguf_path), "--model_alias", model_id,
           "--host", "127.0.0.1", "--port", str(port)]
    if n_ctx is not None:
        cmd += ["--n_ctx", str(n_ctx)]
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as out:
            log.info("starting %s", " ".join(cmd))
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_server_env(), start_new_session=True)
        try:
            _wait_ready(proc, base_url, log_path, model_id, startup_timeout_s)
            yield base_url
        finally:
            _stop(proc)
            log.info("llama_cpp.server on port %d stopped (exit %s)", port, proc.returncode)


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, log_path: Path, model_id: str,
                timeout_s: float) -> None:
    """Poll ``GET /v1/models`` every POLL_S until it answers, the server exits (at once) or ``timeout_s`` passes.

    The poll is the retry policy with a fixed wait (a port opening is waited for, not backed off from) and the
    startup deadline as its only limit; any failed request is worth another poll.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    poll = RetryPolicy(attempts=sys.maxsize, base_wait_s=POLL_S, max_wait_s=POLL_S)
    once = RetryPolicy(attempts=1)

    def ask() -> None:
        if proc.poll() is not None:
            raise HealthError(
                f"llama_cpp.server exited with code {proc.returncode} before it was ready at {base_url}; "
                f"last output:\n{_tail(log_path)}",
                model=model_id,
                fix="check that the GGUF loads (llama-cpp-python version, file not truncated) and that "
                    "llama-cpp-python[server] is installed",
            )
        request_json(http, f"{base_url}/v1/models", body=None, retry=once,
                     deadline=min(time.monotonic() + READY_TIMEOUT_S, deadline))

    try:
        with client() as http:
            poll.call(ask, transient=lambda e: isinstance(e, REQUEST_ERRORS), deadline=deadline,
                      on_retry=lambda failures, wait, error: None)
    except REQUEST_ERRORS as e:
        raise HealthError(
            f"llama_cpp.server not ready at {base_url} within {timeout_s:.0f}s (last error: {describe(e)}); "
            f"last output:\n{_tail(log_path)}",
            model=model_id,
            fix="raise startup_timeout_s for large models, or check the server output above",
        ) from e
    log.info("llama_cpp.server ready at %s after %.1fs", base_url, time.monotonic() - started)


def smoke_test(gguf_path: Path, *, model_id: str, prompt: str, max_tokens: int = 16, startup_timeout_s: float = 120,
               python: str = sys.executable) -> dict[str, Any]:
    """Serve a GGUF with an ephemeral llama.cpp server, check it with ``check_endpoint``, stop the server.

    Returns the check_endpoint report plus ``"startup_s"``; HealthError if it does not start or answer.
    """
    started = time.monotonic()
    with serve_gguf(gguf_path, model_id=model_id, startup_timeout_s=startup_timeout_s, python=python) as url:
        startup = time.monotonic() - started
        try:
            report = check_endpoint(url, model_id=model_id, prompt=prompt, max_tokens=max_tokens)
        except HealthError as e:
            e.for_model(model_id)
            raise
    report["startup_s"] = round(startup, 3)
    return report


def check_gguf_file(path: Path, *, size: int | None, sha256: str | None) -> list[dict[str, Any]]:
    """Checks of an installed GGUF: it exists, has the recorded size and sha256, GGUF magic and a known version."""
    from include.store.hashing import sha256_file

    path = Path(path)
    if not path.is_file():
        return [check("file", False, f"{str(path)!r} does not exist")]
    checks = []
    actual = path.stat().st_size
    checks.append(check("size", size is None or actual == size, f"{actual} bytes (record: {size})"))
    with path.open("rb") as handle:
        head = handle.read(8)
    magic_ok = head[:4] == b"GGUF"
    checks.append(check("gguf_magic", magic_ok, f"magic {head[:4]!r}"))
    version = struct.unpack("<I", head[4:8])[0] if len(head) == 8 else None
    checks.append(check("gguf_version", magic_ok and version in GGUF_VERSIONS,
                        f"version {version} (supported: {list(GGUF_VERSIONS)})"))
    if sha256 is not None:
        digest = sha256_file(path)
        checks.append(check("sha256", digest == sha256, f"{digest[:16]}... (record: {sha256[:16]}...)"))
    return checks


def resources(models_dir: Path | str, artifact_root: Path | str) -> dict[str, Any]:
    """Free disk of the models dir and artifact root, and MemAvailable (bytes; None when unknown)."""
    def free(path: Path | str) -> int | None:
        probe = Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            return shutil.disk_usage(probe).free
        except OSError:
            return None

    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"disk_free_bytes": {"models_dir": free(models_dir), "artifact_root": free(artifact_root)},
            "mem_available_bytes": mem}
