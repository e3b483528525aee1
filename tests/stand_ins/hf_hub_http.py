"""The HTTP side of the Hub stand-in: request bodies (plain or chunked), dispatch to routes, recorded responses."""

from __future__ import annotations

import json
import secrets
import socket
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from tests.stand_ins import AnyMethod
from tests.stand_ins.hf_hub_state import HubError


@dataclass
class Raw:
    """A non-JSON response body with extra headers."""

    content: bytes
    headers: dict[str, str]


class HubHandler(AnyMethod, BaseHTTPRequestHandler):
    """Dispatches every request, whatever its method, to the HubStandIn routes; records every request."""

    protocol_version = "HTTP/1.1"
    hub: Any  # the HubStandIn this handler serves (set on a subclass per server)

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle stalls

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        hub = self.hub
        with hub.lock:
            hub.requests.append((self.command, path))
            route = next(((h, r.match(path)) for meth, r, h in hub.routes if meth == self.command and r.match(path)),
                         None)
            if route is None:
                hub.record_unknown(self.command, self.path)
                status, payload, headers = 404, {"error": f"Sorry, we can't find the page {path}"}, {}
            elif (fault := hub._fault_for(self.command, path)) is not None:
                status, payload = fault["status"], {"error": fault["message"]}
                headers = {"X-Error-Message": fault["message"], **fault["headers"]}
            else:
                handler, match = route
                try:
                    status, payload, headers = 200, handler(self, match.groupdict(), body), {}
                except HubError as e:
                    status, payload = e.status, {"error": e.message, **e.extra}
                    headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
        with hub.lock:
            hub.responses.append((self.command, path, status))
        if isinstance(payload, Raw):
            data, headers = payload.content, {**headers, **payload.headers}
        else:
            data = b"" if payload is None else json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data)), "X-Request-Id": secrets.token_hex(6)}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = unknown_method = _dispatch
