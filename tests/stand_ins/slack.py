"""A Slack incoming-webhook receiver on 127.0.0.1: records the JSON bodies posted to it, answers 200 ``ok``.

Like hooks.slack.com, a POST to another path answers 404 ``no_service`` and another method 405; both are
recorded in ``unknown_routes``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.stand_ins import AnyMethod, StandIn

WEBHOOK_PATH = "/services/T000/B000/XXXX"


class SlackReceiver(StandIn):
    """Context manager: ``url`` is the webhook URL, ``messages`` the posted payloads, ``unknown_routes`` others."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any]] = []
        receiver = self

        class Handler(AnyMethod, BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self._read_body()
                if self.path != WEBHOOK_PATH:
                    receiver.record_unknown("POST", self.path)
                    self._answer(404, b"no_service")
                    return
                receiver.messages.append(json.loads(body or b"{}"))
                self._answer(200, b"ok")

            def unknown_method(self) -> None:
                self._read_body()
                receiver.record_unknown(self.command, self.path)
                self._answer(405, b"invalid_method", {"Allow": "POST"})

            def _read_body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{WEBHOOK_PATH}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def airflow_conn(self) -> str:
        """An ``AIRFLOW_CONN_<ID>`` value of type slackwebhook pointing here."""
        return json.dumps({"conn_type": "slackwebhook", "password": self.url})

    def __enter__(self) -> SlackReceiver:
        self._thread.start()
        self._started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._stopped()
