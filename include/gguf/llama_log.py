"""llama.cpp's in-process log lines (through llama-cpp-python) into Python logging, at their real level.

llama-cpp-python 0.3.36 installs a log callback that maps ggml's levels with an older numbering (its WARN is
ggml's INFO, its ERROR ggml's WARN) and prints what passes straight to stderr. An Airflow task's stderr is logged
at ERROR, so every warning became an ERROR line in the task log. :func:`route_llama_logs` replaces that callback:
each line goes to the logger ``llama.cpp`` at the level ggml gave it (notices from :data:`EXPECTED` at INFO,
debug and info lines at DEBUG: they describe every tensor of every load), continuation fragments joined to
their line.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from include.gguf.tool_log import EXPECTED

log = logging.getLogger("llama.cpp")

# enum ggml_log_level of the pinned llama.cpp (ggml/include/ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
GGML_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
GGML_CONT = 5
_state: dict[str, Any] = {"callback": None, "level": logging.DEBUG, "buffer": ""}


def emit(level: int, text: str) -> None:
    """Handle one callback call: buffer until a newline, then log the line at its level (see the module doc)."""
    if level != GGML_CONT:
        _state["level"] = GGML_LEVELS.get(level, logging.DEBUG)
    _state["buffer"] += text
    *lines, _state["buffer"] = _state["buffer"].split("\n")
    for line in lines:
        if not line.strip():
            continue
        found = _state["level"]
        if found >= logging.WARNING and any(expected in line for expected in EXPECTED):
            found = logging.INFO
        log.log(found, "%s", line.strip())


def route_llama_logs() -> None:
    """Install the callback (once per process; llama_cpp must be importable). Idempotent."""
    if _state["callback"] is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        emit(int(level), text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _state["callback"] = callback  # a reference for as long as llama.cpp may call it
