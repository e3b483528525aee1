"""The trigger client's retries: the typed apache-airflow-client and the login, against a scripted api-server.

The full client runs against a real api-server in tests/e2e/test_trigger_client.py and test_concurrency.py; a
real api-server cannot be made to answer 503 on demand, so the retry paths are scripted here on loopback. Waits
are recorded, never slept.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from include.config.pools import PoolSettings
from include.errors import TriggerError
from include.retry import RetryPolicy
from include.trigger.client import AirflowClient, apply_pools_rest


def pool_record(name: str, slots: int, description: str) -> dict[str, Any]:
    """A ``PoolResponse`` as the api-server sends it."""
    return {"name": name, "slots": slots, "description": description, "include_deferred": False,
            "occupied_slots": 0, "running_slots": 0, "queued_slots": 0, "scheduled_slots": 0, "open_slots": slots,
            "deferred_slots": 0, "team_name": None}


class ScriptedAPI:
    """Answers each request with the next scripted ``(status, body, headers)``; records method, path and body."""

    def __init__(self) -> None:
        self.script: list[tuple[int, Any, dict[str, str]]] = []
        self.seen: list[tuple[str, str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen.append((self.command, self.path, json.loads(raw) if raw else None))
                status, body, headers = outer.script.pop(0) if outer.script else (599, {"detail": "unscripted"}, {})
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                   **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def api() -> Iterator[ScriptedAPI]:
    scripted = ScriptedAPI()
    thread = threading.Thread(target=scripted.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield scripted
    scripted.server.shutdown()
    scripted.server.server_close()
    assert scripted.script == [], "scripted answers left unasked"


def test_login_is_tried_again_on_503_and_honours_retry_after(api: ScriptedAPI) -> None:
    waits: list[float] = []
    api.script = [(503, {"detail": "starting"}, {"Retry-After": "3"}), (201, {"access_token": "jwt-1"}, {})]
    client = AirflowClient.login(api.url, "admin", "pw", retry=RetryPolicy(sleep=waits.append))
    assert client.token == "jwt-1" and waits == [3.0]
    assert api.seen == [("POST", "/auth/token", {"username": "admin", "password": "pw"})] * 2


def test_pools_reads_are_retried_and_the_whole_pool_is_patched(api: ScriptedAPI, capsys) -> None:
    waits: list[float] = []
    client = AirflowClient(url=api.url, token="jwt", retry=RetryPolicy(sleep=waits.append))
    api.script = [(502, {"detail": "proxy"}, {}), (200, pool_record("heavy", 4, "old"), {}),
                  (200, pool_record("heavy", 8, "new"), {})]
    lines = apply_pools_rest(client, {"heavy": PoolSettings(slots=8, description="new")})
    assert lines == ["pool heavy: 4 -> 8 slots"] and waits == [1.0]
    assert [(m, p) for m, p, _ in api.seen] == [("GET", "/api/v2/pools/heavy")] * 2 + [("PATCH", "/api/v2/pools/heavy")]
    assert api.seen[-1][2] == {"pool": "heavy", "slots": 8, "description": "new", "include_deferred": False}
    assert "the api-server answered HTTP 502 (try 1)" in capsys.readouterr().err


def test_a_post_the_server_may_have_acted_on_is_not_repeated(api: ScriptedAPI) -> None:
    client = AirflowClient(url=api.url, token="jwt", retry=RetryPolicy(sleep=lambda s: pytest.fail("must not wait")))
    api.script = [(404, {"detail": "The Pool with name: `heavy` was not found"}, {}),
                  (500, {"detail": "Internal Server Error"}, {})]
    with pytest.raises(TriggerError, match=r"POST /pools answered HTTP 500.*Fix: see the api-server's log"):
        apply_pools_rest(client, {"heavy": PoolSettings(slots=2)})
    assert [m for m, _, _ in api.seen] == ["GET", "POST"]


def test_a_refused_pool_names_the_fields_and_the_fix(api: ScriptedAPI) -> None:
    client = AirflowClient(url=api.url, token="jwt")
    detail = {"detail": [{"loc": ["body", "slots"], "msg": "Input should be greater than or equal to -1"}]}
    api.script = [(200, pool_record("heavy", 4, "old"), {}), (422, detail, {})]
    with pytest.raises(TriggerError, match=r"PATCH /pools/heavy answered HTTP 422: .*slots.*check settings\.pools"):
        apply_pools_rest(client, {"heavy": PoolSettings(slots=5, description="old")})


def test_an_expired_token_is_a_credentials_error(api: ScriptedAPI) -> None:
    client = AirflowClient(url=api.url, token="expired")
    api.script = [(401, {"detail": "Not authenticated"}, {})]
    with pytest.raises(TriggerError, match=r"GET /pools/heavy answered HTTP 401.*LORA_DEPLOY_AIRFLOW_PASSWORD"):
        client.pool("heavy")
    assert api.seen[0][:2] == ("GET", "/api/v2/pools/heavy")
