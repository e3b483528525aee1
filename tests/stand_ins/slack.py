"""A Slack incoming-webhook receiver on 127.0.0.1: records the JSON bodies posted to it, answers 200 ``ok``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WEBHOOK_PATH = "/services/T000/B000/XXXX"


class SlackReceiver:
    """Context manager: ``url`` is the webhook URL, ``messages`` the posted payloads, ``unknown_routes`` others."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.unknown_routes: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != WEBHOOK_PATH:
                    receiver.unknown_routes.append(f"POST {self.path}")
                    self._answer(404, b"no_service")
                    return
                receiver.messages.append(json.loads(body or b"{}"))
                self._answer(200, b"ok")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
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
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
