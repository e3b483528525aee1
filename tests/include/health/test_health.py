"""include.health (endpoint checks, the smoke server) against a real llama_cpp.server serving the tiny Q8_0 GGUF."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from include.errors import HealthError
from include.health.endpoint import ENDPOINT_RETRY, check_endpoint
from include.health.smoke import serve_gguf, smoke_test

PROMPT = "Hello world, deploy the model"


def _port_closed(base_url: str, deadline_s: float = 10.0) -> bool:
    """True once nothing accepts connections on base_url's port (polled until the deadline)."""
    port = urllib.parse.urlsplit(base_url).port
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.1)
    return False


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_smoke_test_serves_and_generates(q8_gguf: Path) -> None:
    report = smoke_test(q8_gguf, model_id="tiny-q8", prompt=PROMPT, max_tokens=8, startup_timeout_s=60)
    assert report["ok"] is True
    assert report["model_id"] == "tiny-q8"
    assert 1 <= report["completion_tokens"] <= 8
    assert report["latency_s"] > 0 and report["tokens_per_s"] > 0
    assert isinstance(report["answer"], str) and len(report["answer"]) <= 200
    assert report["startup_s"] < 60
    assert _port_closed(report["endpoint"]), "the server kept running after smoke_test returned"


def test_server_is_stopped_when_the_check_fails(q8_gguf: Path) -> None:
    with serve_gguf(q8_gguf, model_id="tiny-q8", startup_timeout_s=60) as url:
        with pytest.raises(HealthError, match=r"model 'other' is not listed .*'tiny-q8'") as caught:
            check_endpoint(url, model_id="other", prompt=PROMPT)
        assert url in str(caught.value)
        report = check_endpoint(url, model_id="tiny-q8", prompt=PROMPT, max_tokens=4)
        assert report["endpoint"] == url and report["completion_tokens"] >= 1
    assert _port_closed(url)


def test_check_endpoint_on_a_dead_port_tries_again_then_explains(tmp_path: Path) -> None:
    url, waits = _dead_url(), []
    retry = dataclasses.replace(ENDPOINT_RETRY, sleep=waits.append)
    with pytest.raises(HealthError, match=r"endpoint 'http://127\.0\.0\.1:\d+'.*GET /v1/models failed "
                                          r"\(ConnectError: .*Fix: "):
        check_endpoint(url, model_id="tiny", prompt=PROMPT, timeout_s=5, retry=retry)
    assert waits == [0.5, 1.0]  # three tries: a refused connection may be a server restarting


def test_smoke_test_of_a_broken_gguf_reports_server_output(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    started = time.monotonic()
    with pytest.raises(HealthError, match=r"model 'broken': llama_cpp.server exited with code \d+.*last output"):
        smoke_test(broken, model_id="broken", prompt=PROMPT, startup_timeout_s=60)
    assert time.monotonic() - started < 30  # the exit is noticed at once, not at the deadline


def test_smoke_test_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HealthError, match="does not exist"):
        smoke_test(tmp_path / "nope.gguf", model_id="x", prompt=PROMPT)


class _NoTokens(BaseHTTPRequestHandler):
    """An OpenAI-style endpoint that lists the model but answers every completion with zero tokens."""

    def _send(self, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send({"choices": [{"text": "", "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 0}})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def no_tokens_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoTokens)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_check_endpoint_without_tokens_fails(no_tokens_url: str) -> None:
    with pytest.raises(HealthError, match=r"returned no tokens"):
        check_endpoint(no_tokens_url, model_id="tiny", prompt=PROMPT)


def test_file_checks_catch_size_sha_magic_and_version(q8_gguf: Path, tmp_path: Path) -> None:
    from include.health.smoke import check_gguf_file
    from include.store.hashing import sha256_file

    good = check_gguf_file(q8_gguf, size=q8_gguf.stat().st_size, sha256=sha256_file(q8_gguf))
    assert [(c["name"], c["ok"]) for c in good] == [("size", True), ("gguf_magic", True), ("gguf_version", True),
                                                    ("sha256", True)]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x09\x00\x00\x00rest")
    checks = {c["name"]: c for c in check_gguf_file(bad, size=5, sha256="00" * 32)}
    assert not checks["size"]["ok"] and not checks["sha256"]["ok"] and checks["gguf_magic"]["ok"]
    assert not checks["gguf_version"]["ok"] and "version 9" in checks["gguf_version"]["detail"]
    bad.write_bytes(b"PK\x03\x04zipfile!")
    assert not {c["name"]: c for c in check_gguf_file(bad, size=None, sha256=None)}["gguf_magic"]["ok"]
    assert check_gguf_file(tmp_path / "gone.gguf", size=1, sha256=None) == [
        {"name": "file", "ok": False, "detail": f"{str(tmp_path / 'gone.gguf')!r} does not exist"}]


def test_chat_check_against_the_lm_studio_stand_in(q8_gguf: Path, lmstudio: object) -> None:
    """The stand-in lists only depth-2 files, loads just in time, and answers chat completions via llama.cpp."""
    import shutil
    import subprocess

    from include.health.endpoint import check_chat, evaluate

    repo = lmstudio.models_dir / "acme" / "tiny-GGUF"
    repo.mkdir(parents=True)
    shutil.copy(q8_gguf, repo / "tiny-Q8_0.gguf")
    shutil.copy(q8_gguf, lmstudio.models_dir / "acme" / "too-shallow.gguf")
    (repo / "deeper").mkdir()
    shutil.copy(q8_gguf, repo / "deeper" / "too-deep.gguf")
    assert lmstudio.model_ids() == ["acme/tiny-GGUF/tiny-Q8_0.gguf"]
    with pytest.raises(HealthError, match=r"'tiny' is not listed by /v1/models"):
        check_chat(lmstudio.url, model_id="tiny", system_prompt="Be brief.", prompt=PROMPT)
    load = ["lms", "load", "acme/tiny-GGUF/tiny-Q8_0.gguf", "--identifier", "tiny"]
    assert subprocess.run(load, check=False).returncode == 0
    assert lmstudio.loads == []  # nothing loaded before the first request
    figures = check_chat(lmstudio.url, model_id="tiny", system_prompt="Be brief.", prompt=PROMPT, max_tokens=6)
    assert lmstudio.loads == [("tiny", str(repo / "tiny-Q8_0.gguf"))]
    assert 1 <= figures["completion_tokens"] <= 6 and figures["tokens_per_s"] > 0
    assert lmstudio.requests[-1]["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    checks = evaluate(figures, max_latency_s=30, min_tokens_per_s=1e9, min_answer_tokens=1)
    assert [c["ok"] for c in checks] == [True, True, False]
    lmstudio.set_fail("tiny", "error")
    waits: list[float] = []
    asked = len(lmstudio.requests)
    with pytest.raises(HealthError, match=r"chat/completions for 'tiny' failed \(HTTP 500"):
        check_chat(lmstudio.url, model_id="tiny", system_prompt="s", prompt=PROMPT,
                   retry=dataclasses.replace(ENDPOINT_RETRY, sleep=waits.append))
    chats = [r for r in lmstudio.requests[asked:] if r["path"].endswith("/chat/completions")]
    assert len(chats) == 3 and waits == [0.5, 1.0]  # a 500 is tried twice more, then reported
