"""Health checks of a served model through its OpenAI-compatible API (llama.cpp server, LM Studio).

- :func:`check_endpoint` is the **live** check: the model is listed by ``GET /v1/models`` and
  ``POST /v1/completions`` returns at least one token; it reports latency and tokens/s.
- :func:`check_chat` is the same through ``POST /v1/chat/completions`` with the model's system prompt (what
  LM Studio users send); :func:`evaluate` turns a report into named checks against the thresholds.
- :func:`check_gguf_file` checks an installed file: size, sha256 against the record, GGUF magic and version.
- :func:`smoke_test` is the **smoke** check of an artifact before promotion: it serves the GGUF with an
  ephemeral ``python -m llama_cpp.server`` on a free loopback port, runs :func:`check_endpoint` against it
  and always stops the server's whole process group.

Standard library only (urllib), so the check runs anywhere, including a deferred trigger.
"""

from __future__ import annotations

import json
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
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from include.errors import HealthError

log = logging.getLogger(__name__)

ANSWER_CHARS = 200
POLL_S = 0.2
STOP_GRACE_S = 10.0
TAIL_LINES = 30


def _request(url: str, *, body: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
    """GET (body None) or POST JSON to ``url`` and return the decoded JSON object."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=max(timeout_s, 0.1)) as response:
        payload = json.loads(response.read().decode("utf-8"))
    if not isinstance(payload, dict):
        raise TypeError(f"expected a JSON object, got {type(payload).__name__}")
    return payload


def _fail(base_url: str, what: str, fix: str) -> HealthError:
    return HealthError(f"endpoint {base_url!r}: {what}", fix=fix)


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        body = e.read().decode("utf-8", errors="replace")[:300]
        return f"HTTP {e.code} {e.reason}: {body}"
    if isinstance(e, urllib.error.URLError):
        return f"{type(e.reason).__name__}: {e.reason}"
    return f"{type(e).__name__}: {e}"


def require_listed(base_url: str, model_id: str, deadline: float) -> None:
    """HealthError unless ``GET /v1/models`` answers before ``deadline`` (monotonic) and lists ``model_id``."""
    try:
        listing = _request(f"{base_url.rstrip('/')}/v1/models", body=None, timeout_s=deadline - time.monotonic())
    except (OSError, ValueError, TypeError) as e:
        raise _fail(base_url, f"GET /v1/models failed ({_describe(e)})",
                    "check that the server is running and the URL (scheme, host, port) is right") from e
    if model_id not in served_ids(listing):
        raise _fail(base_url, f"model {model_id!r} is not listed by /v1/models (served: {served_ids(listing)!r})",
                    "load the model (LM Studio: `lms load`) or check lmstudio.identifier")


def check_endpoint(base_url: str, *, model_id: str, prompt: str, max_tokens: int = 16,
                   timeout_s: float = 60) -> dict[str, Any]:
    """Check that ``model_id`` is served at ``base_url`` and generates; HealthError naming what failed.

    Returns ``{"ok", "endpoint", "model_id", "latency_s", "completion_tokens", "tokens_per_s", "answer"}``.
    """
    base = base_url.rstrip("/")
    deadline = time.monotonic() + timeout_s
    require_listed(base_url, model_id, deadline)
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}
    started = time.monotonic()
    try:
        result = _request(f"{base}/v1/completions", body=body, timeout_s=deadline - time.monotonic())
    except (OSError, ValueError, TypeError) as e:
        raise _fail(base_url, f"POST /v1/completions for {model_id!r} failed ({_describe(e)})",
                    "check the server log; the model may have failed to load or the request timed out") from e
    latency = time.monotonic() - started
    choices = result.get("choices") or [{}]
    answer = str(choices[0].get("text") or "")
    usage = result.get("usage") or {}
    tokens = int(usage.get("completion_tokens") or 0)
    if tokens < 1:
        raise _fail(base_url, f"POST /v1/completions for {model_id!r} returned no tokens "
                              f"(usage {usage!r}, text {answer[:80]!r})",
                    "the model produced end-of-sequence at once or is broken: try another prompt, "
                    "check the GGUF and its tokenizer")
    report = {
        "ok": True,
        "endpoint": base_url,
        "model_id": model_id,
        "latency_s": round(latency, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / latency, 2) if latency > 0 else None,
        "answer": answer[:ANSWER_CHARS],
    }
    log.info("health %s %s: %d tokens in %.2fs (%s tok/s)", base_url, model_id, tokens, latency,
             report["tokens_per_s"])
    return report


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
               n_ctx: int | None = None) -> Iterator[str]:
    """Serve ``gguf_path`` with ``python -m llama_cpp.server`` on a free loopback port; yield its base URL.

    The server runs in its own process group, which is always stopped on exit (also on errors).
    HealthError with the tail of the server output if it exits or is not ready by the deadline.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise HealthError(f"GGUF {str(gguf_path)!r} does not exist", model=model_id,
                          fix="run the quantize stage first")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", model_id,
           "--host", "127.0.0.1", "--port", str(port)]
    if n_ctx is not None:
        cmd += ["--n_ctx", str(n_ctx)]
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as out:
            log.info("starting %s", " ".join(cmd))
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        try:
            _wait_ready(proc, base_url, log_path, model_id, startup_timeout_s)
            yield base_url
        finally:
            _stop(proc)
            log.info("llama_cpp.server on port %d stopped (exit %s)", port, proc.returncode)


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, log_path: Path, model_id: str,
                timeout_s: float) -> None:
    started = time.monotonic()
    deadline = started + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HealthError(
                f"llama_cpp.server exited with code {proc.returncode} before it was ready at {base_url}; "
                f"last output:\n{_tail(log_path)}",
                model=model_id,
                fix="check that the GGUF loads (llama-cpp-python version, file not truncated) and that "
                    "llama-cpp-python[server] is installed",
            )
        try:
            _request(f"{base_url}/v1/models", body=None, timeout_s=2.0)
            log.info("llama_cpp.server ready at %s after %.1fs", base_url, time.monotonic() - started)
            return
        except (OSError, ValueError, TypeError) as e:
            last_error = _describe(e)
        time.sleep(POLL_S)  # polling interval while waiting for the port to open, bounded by the deadline
    raise HealthError(
        f"llama_cpp.server not ready at {base_url} within {timeout_s:.0f}s (last error: {last_error}); "
        f"last output:\n{_tail(log_path)}",
        model=model_id,
        fix="raise startup_timeout_s for large models, or check the server output above",
    )


def smoke_test(gguf_path: Path, *, model_id: str, prompt: str, max_tokens: int = 16, startup_timeout_s: float = 120,
               python: str = sys.executable) -> dict[str, Any]:
    """Serve a GGUF with an ephemeral llama.cpp server, check it with :func:`check_endpoint`, stop the server.

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


GGUF_VERSIONS = (2, 3)


def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    """One named check of a health report."""
    return {"name": name, "ok": bool(ok), "detail": detail}


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


def chat_body(model_id: str, *, system_prompt: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The OpenAI chat-completions request of a health check (deterministic: temperature 0)."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    return {"model": model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}


def served_ids(listing: dict[str, Any]) -> list[str]:
    """The model ids of a ``GET /v1/models`` answer."""
    return [str(item.get("id")) for item in listing.get("data", []) if isinstance(item, dict)]


def chat_report(base_url: str, model_id: str, result: dict[str, Any], latency: float) -> dict[str, Any]:
    """The figures of one chat completion: latency, completion tokens, tokens/s and the answer excerpt."""
    choices = result.get("choices") or [{}]
    message = choices[0].get("message") or {}
    answer = str(message.get("content") or choices[0].get("text") or "")
    tokens = int((result.get("usage") or {}).get("completion_tokens") or 0)
    return {"endpoint": base_url, "model_id": model_id, "latency_s": round(latency, 3), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / latency, 2) if latency > 0 else None,
            "answer_excerpt": answer[:ANSWER_CHARS]}


def check_chat(base_url: str, *, model_id: str, system_prompt: str, prompt: str, max_tokens: int = 16,
               timeout_s: float = 60) -> dict[str, Any]:
    """``GET /v1/models`` lists ``model_id`` and ``POST /v1/chat/completions`` answers; HealthError if not.

    Returns :func:`chat_report`'s figures (thresholds are applied by :func:`evaluate`).
    """
    base = base_url.rstrip("/")
    deadline = time.monotonic() + timeout_s
    require_listed(base_url, model_id, deadline)
    body = chat_body(model_id, system_prompt=system_prompt, prompt=prompt, max_tokens=max_tokens)
    started = time.monotonic()
    try:
        result = _request(f"{base}/v1/chat/completions", body=body, timeout_s=deadline - time.monotonic())
    except (OSError, ValueError, TypeError) as e:
        raise _fail(base_url, f"POST /v1/chat/completions for {model_id!r} failed ({_describe(e)})",
                    "check the server log; the model may have failed to load or the request timed out") from e
    return chat_report(base_url, model_id, result, time.monotonic() - started)


def evaluate(figures: dict[str, Any], *, max_latency_s: float, min_tokens_per_s: float,
             min_answer_tokens: int) -> list[dict[str, Any]]:
    """Named checks of a chat report against the thresholds of ``health``."""
    latency, tokens, rate = figures["latency_s"], figures["completion_tokens"], figures["tokens_per_s"] or 0.0
    return [
        check("answer_tokens", tokens >= min_answer_tokens, f"{tokens} tokens (min_answer_tokens {min_answer_tokens})"),
        check("latency", latency <= max_latency_s, f"{latency:.2f} s (max_latency_s {max_latency_s})"),
        check("tokens_per_s", rate >= min_tokens_per_s, f"{rate:.1f} tokens/s (min_tokens_per_s {min_tokens_per_s})"),
    ]


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
