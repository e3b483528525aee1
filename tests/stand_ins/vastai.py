"""A Vast.ai REST API stand-in on 127.0.0.1: ``GET /api/v0/instances/{id}/?owner=me`` and nothing else.

``instances`` maps an id to the record the API would return (``actual_status``, ``ssh_host``, ``ssh_port``,
``public_ipaddr``, ``ports``). ``failures`` is a queue of HTTP statuses answered before the real answer
(to script 429/5xx). Every request is recorded with its method, path and Authorization header; requests with
another bearer key get 401, unknown ids ``{"instances": null}`` like the real API, other paths 404 and other
methods 405, both recorded in ``unknown_routes``.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from tests.stand_ins import AnyMethod, StandIn

_PREFIX = "/api/v0/instances/"


class VastAIStandIn(StandIn):
    """Context manager: ``url`` is the API base URL, ``api_key`` the only key it accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.api_key = "vast-" + secrets.token_hex(16)
        self.instances: dict[str, dict[str, Any]] = {}
        self.failures: list[int] = []
        self.requests: list[dict[str, str]] = []  # method, path, query, authorization
        self._lock = threading.Lock()
        stand_in = self

        class Handler(AnyMethod, BaseHTTPRequestHandler):
            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls

            def do_GET(self) -> None:
                stand_in._get(self)

            def unknown_method(self) -> None:
                stand_in._unknown_method(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_instance(self, instance_id: str, *, status: str = "running", ssh_host: str = "127.0.0.1",
                     ssh_port: int = 22, public_ip: str | None = None, direct_port: int | None = None) -> None:
        """Register an instance record shaped like the API's."""
        ports = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(direct_port)}]} if direct_port else {}
        self.instances[instance_id] = {
            "id": int(instance_id), "actual_status": status, "intended_status": status, "ssh_host": ssh_host,
            "ssh_port": ssh_port, "public_ipaddr": public_ip, "ports": ports, "machine_id": 4242,
        }

    def airflow_conn(self, key: str | None = None) -> str:
        """An ``AIRFLOW_CONN_VASTAI_DEFAULT`` value: host = this URL, password = the key."""
        return json.dumps({"conn_type": "generic", "host": self.url, "password": key or self.api_key})

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        auth = handler.headers.get("Authorization", "")
        with self._lock:
            self.requests.append({"method": "GET", "path": parts.path, "query": parts.query, "authorization": auth})
            failure = self.failures.pop(0) if self.failures else None
        ident = parts.path[len(_PREFIX):].strip("/") if parts.path.startswith(_PREFIX) else ""
        if not ident.isdigit() or parse_qs(parts.query).get("owner") != ["me"]:
            self.record_unknown("GET", handler.path)
            self._answer(handler, 404, {"error": "not_found"})
        elif auth != f"Bearer {self.api_key}":
            self._answer(handler, 401, {"success": False, "error": "invalid_user_key", "msg": "Invalid user key"})
        elif failure is not None:
            extra = {"Retry-After": "0"} if failure == 429 else {}
            self._answer(handler, failure, {"error": "scripted failure"}, extra)
        else:
            self._answer(handler, 200, {"instances": self.instances.get(ident)})

    def _unknown_method(self, handler: BaseHTTPRequestHandler) -> None:
        handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        parts = urlsplit(handler.path)
        with self._lock:
            self.requests.append({"method": handler.command, "path": parts.path, "query": parts.query,
                                  "authorization": handler.headers.get("Authorization", "")})
        self.record_unknown(handler.command, handler.path)
        self._answer(handler, 405, {"error": "method_not_allowed"}, {"Allow": "GET"})

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def __enter__(self) -> Self:
        self._thread.start()
        self._started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._stopped()
