"""The engine's one retry policy (include.retry) with httpx against a scripted HTTP server on loopback.

Waits are recorded by the injected ``sleep``, never slept.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from include.retry import RetryPolicy, retry_after_s, send


class Scripted:
    """An HTTP server answering each request with the next scripted answer (then 200): a status with headers, or
    ``"drop"`` to close the connection without an answer. Records the method of every request."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.methods: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.methods.append(self.command)
                step = outer.script.pop(0) if outer.script else (200, {})
                if step == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                status, headers = step
                self.send_response(status)
                for key, value in {"Content-Length": "2", **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/x"


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    thread = threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def _send(scripted: Scripted, policy: RetryPolicy, method: str = "GET", **kwargs: Any) -> httpx.Response:
    with httpx.Client(trust_env=False) as client:
        return send(client, method, scripted.url, policy=policy, **kwargs)


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s("7") == 7.0 and retry_after_s(" 0 ") == 0.0
    assert retry_after_s(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now) == 30.0
    assert retry_after_s(format_datetime(now - timedelta(hours=1), usegmt=True), now=now) == 0.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("nan") is None


def test_transient_answers_are_tried_again_honouring_retry_after_capped(scripted: Scripted) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=3600), usegmt=True)
    scripted.script = [(429, {"Retry-After": "2"}), (503, {"Retry-After": later}), (502, {}), (500, {})]
    waits: list[float] = []
    response = _send(scripted, RetryPolicy(attempts=5, base_wait_s=1.0, max_wait_s=10.0, sleep=waits.append))
    assert response.status_code == 200 and len(scripted.methods) == 5
    assert waits == [2.0, 10.0, 4.0, 8.0]  # Retry-After (a date an hour away: capped), else 1 s doubled per try


def test_the_last_answer_comes_back_when_the_tries_are_spent(scripted: Scripted) -> None:
    scripted.script = [(503, {})] * 5
    waits: list[float] = []
    response = _send(scripted, RetryPolicy(attempts=3, base_wait_s=0.5, sleep=waits.append))
    assert response.status_code == 503 and len(scripted.methods) == 3 and waits == [0.5, 1.0]


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422])
def test_answers_a_retry_cannot_fix_come_back_at_once(scripted: Scripted, status: int) -> None:
    scripted.script = [(status, {})]
    response = _send(scripted, RetryPolicy(sleep=lambda s: pytest.fail("must not wait")))
    assert response.status_code == status and scripted.methods == ["GET"]


def test_a_dropped_connection_is_tried_again(scripted: Scripted) -> None:
    scripted.script = ["drop"]
    waits: list[float] = []
    assert _send(scripted, RetryPolicy(sleep=waits.append)).status_code == 200
    assert scripted.methods == ["GET", "GET"] and waits == [1.0]


def test_a_request_that_is_not_idempotent_is_repeated_only_when_the_server_did_not_act(scripted: Scripted) -> None:
    scripted.script = [(503, {}), (500, {})]
    waits: list[float] = []
    response = _send(scripted, RetryPolicy(sleep=waits.append), "POST", idempotent=False, json={"a": 1})
    assert response.status_code == 500 and scripted.methods == ["POST", "POST"] and waits == [1.0]
    scripted.methods.clear()
    scripted.script = ["drop"]
    with pytest.raises(httpx.RemoteProtocolError):
        _send(scripted, RetryPolicy(sleep=waits.append), "POST", idempotent=False)
    assert scripted.methods == ["POST"]


def test_a_refused_connection_is_raised_after_the_tries() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    waits: list[float] = []
    with httpx.Client(trust_env=False) as client, pytest.raises(httpx.ConnectError):
        send(client, "POST", url, policy=RetryPolicy(attempts=2, sleep=waits.append), idempotent=False)
    assert waits == [1.0]  # never connected: safe to repeat even a POST


def test_no_retry_waits_past_the_deadline(scripted: Scripted) -> None:
    scripted.script = [(503, {"Retry-After": "30"})] * 3
    waits: list[float] = []
    response = _send(scripted, RetryPolicy(sleep=waits.append), deadline=time.monotonic() + 5)
    assert response.status_code == 503 and scripted.methods == ["GET"] and waits == []


def test_backoff_is_capped_however_many_tries_failed() -> None:
    policy = RetryPolicy(base_wait_s=0.2, max_wait_s=1.5)
    assert [policy.wait_s(n) for n in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, 1.5]
    assert policy.wait_s(100_000) == 1.5 and policy.wait_s(3, retry_after=99.0) == 1.5


def test_other_failures_pass_through_untouched() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise KeyError("not an HTTP failure")

    with pytest.raises(KeyError):
        RetryPolicy(sleep=lambda s: pytest.fail("must not wait")).call(broken)
    assert calls == [1]
