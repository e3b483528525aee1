"""An LM Studio stand-in: its OpenAI-compatible server on 127.0.0.1, backed by real llama.cpp.

Behaves like LM Studio's server where lora-deploy depends on it:

- ``GET /v1/models`` lists the GGUFs found at exactly ``<models_dir>/<publisher>/<repo>/<file>.gguf`` (LM Studio
  ignores other depths) by their key ``publisher/repo/file.gguf``, plus every identifier loaded with ``lms load``.
- ``POST /v1/chat/completions`` for a loaded identifier or a key loads the GGUF with ``llama_cpp.Llama``
  just in time on the first request (again when the file was replaced since), and answers in OpenAI's format.
- The loaded identifiers live in a JSON state file shared with the ``lms`` stand-in (tests/stand_ins/lms), so
  ``lms load/unload`` change what this server serves. ``fail`` in the state makes an identifier answer HTTP 500
  (``"error"``) or slowly (``"slow:<seconds>"``), for failing health checks.
- Any other path or method is answered like LM Studio does, HTTP 200 with
  ``{"error": "Unexpected endpoint or method. (GET /path)"}``, and recorded in ``unknown_routes``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.stand_ins import AnyMethod, StandIn

N_CTX = 512


def read_state(path: Path) -> dict[str, Any]:
    """The shared state ``{"loaded": {identifier: {...}}, "fail": {identifier: mode}}``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"loaded": {}, "fail": {}}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write the shared state atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


class LMStudioStandIn(StandIn):
    """Context manager: ``url`` is the server's base URL; ``loads`` lists ``(identifier, path)`` JIT loads,
    ``requests`` the POSTed paths and bodies, ``unknown_routes`` the requests it does not serve."""

    def __init__(self, models_dir: Path, state_file: Path) -> None:
        super().__init__()
        self.models_dir = Path(models_dir)
        self.state_file = Path(state_file)
        self.loads: list[tuple[str, str]] = []
        self.requests: list[dict[str, Any]] = []
        self._llamas: dict[str, tuple[tuple[str, int, int], Any]] = {}
        self._lock = threading.Lock()
        stand_in = self

        class Handler(AnyMethod, BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") != "/v1/models":
                    self.unknown_method()
                    return
                data = [{"id": i, "object": "model", "owned_by": "organization_owner"} for i in stand_in.model_ids()]
                self._send(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                stand_in.requests.append({"path": self.path, "body": body})
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self.unknown_method(read_body=False)
                    return
                status, payload = stand_in.chat(body)
                self._send(status, payload)

            def unknown_method(self, read_body: bool = True) -> None:
                if read_body:
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in.record_unknown(self.command, self.path)
                # LM Studio answers 200 ("Returning 200 anyway" in its log), not 404.
                self._send(200, {"error": f"Unexpected endpoint or method. ({self.command} {self.path})"})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def tree_keys(self) -> list[str]:
        """Keys of the GGUFs at LM Studio's depth: ``publisher/repo/file.gguf``."""
        return sorted(str(p.relative_to(self.models_dir)) for p in self.models_dir.glob("*/*/*.gguf")
                      if p.is_file() and not p.name.startswith("."))

    def model_ids(self) -> list[str]:
        """What ``/v1/models`` lists: the tree's keys and the loaded identifiers."""
        return self.tree_keys() + sorted(read_state(self.state_file)["loaded"])

    def chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Answer one chat completion (loading the model just in time)."""
        ident = str(body.get("model", ""))
        state = read_state(self.state_file)
        if ident in state["loaded"]:
            path = Path(state["loaded"][ident]["path"])
        elif ident in self.tree_keys():
            path = self.models_dir / ident
        else:
            return 404, {"error": f"Model '{ident}' not found. Loaded: {sorted(state['loaded'])}"}
        mode = state.get("fail", {}).get(ident, "")
        if mode == "error":
            return 500, {"error": f"Model '{ident}' crashed while generating (stand-in failure mode)"}
        if mode.startswith("slow:"):
            time.sleep(float(mode.split(":", 1)[1]))
        messages = body.get("messages") or []
        with self._lock:
            llama = self._llama(ident, path)
            result = llama.create_chat_completion(messages=messages, max_tokens=int(body.get("max_tokens") or 16),
                                                  temperature=float(body.get("temperature") or 0.0))
        result["model"] = ident
        return 200, dict(result)

    def _llama(self, ident: str, path: Path) -> Any:
        from llama_cpp import Llama

        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_mtime_ns)
        cached = self._llamas.get(ident)
        if cached is None or cached[0] != key:
            self._llamas[ident] = (key, Llama(model_path=str(path), n_ctx=N_CTX, verbose=False))
            self.loads.append((ident, str(path)))
        return self._llamas[ident][1]

    def set_fail(self, ident: str, mode: str | None) -> None:
        """Make ``ident`` fail (``"error"``, ``"slow:<s>"``) or behave again (None)."""
        state = read_state(self.state_file)
        fail = state.setdefault("fail", {})
        if mode is None:
            fail.pop(ident, None)
        else:
            fail[ident] = mode
        write_state(self.state_file, state)

    def __enter__(self) -> LMStudioStandIn:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        if not self.state_file.exists():
            write_state(self.state_file, {"loaded": {}, "fail": {}})
        self._thread.start()
        self._started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._llamas.clear()
        self._stopped()
