"""HTTP stand-ins for the services the tests cannot reach, and the record of requests they do not serve.

Every HTTP stand-in is a :class:`StandIn`: a request for a route or a method it does not serve is answered the way
the real service answers it and recorded in ``unknown_routes`` as ``"METHOD /path?query"``. A stand-in registers
itself when started; after each test the autouse fixture in ``tests/conftest.py`` calls :func:`unknown_route_report`
and fails the test when any stand-in used in it recorded one. A test that means to hit an unknown route says so
with :meth:`StandIn.expect_unknown`.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

_registry: list[StandIn] = []
_registry_lock = threading.Lock()


class StandIn:
    """Base of the HTTP stand-ins: ``unknown_routes`` and the registry the per-test check reads.

    Subclasses call :meth:`_started` once their server listens and :meth:`_stopped` when it is shut down, and
    :meth:`record_unknown` for each request they do not serve.
    """

    def __init__(self) -> None:
        self.unknown_routes: list[str] = []
        self.running = False
        self._record_lock = threading.Lock()

    def record_unknown(self, method: str, target: str) -> None:
        """Record a request this stand-in does not serve: ``method`` and the request target (path and query)."""
        with self._record_lock:
            self.unknown_routes.append(f"{method} {target}")

    def expect_unknown(self, *routes: str) -> None:
        """Acknowledge that the test meant to hit ``routes`` (``"METHOD /path"``, any order): assert they are
        exactly what was recorded since the last acknowledgement, then clear the record."""
        with self._record_lock:
            recorded = list(self.unknown_routes)
            self.unknown_routes.clear()
        assert Counter(recorded) == Counter(routes), f"{self!r} recorded {recorded}, the test expected {list(routes)}"

    def take_unknown_routes(self) -> list[str]:
        """The routes recorded so far, clearing the record (each unknown route is reported once)."""
        with self._record_lock:
            recorded = list(self.unknown_routes)
            self.unknown_routes.clear()
        return recorded

    def _started(self) -> None:
        self.running = True
        with _registry_lock:
            _registry.append(self)

    def _stopped(self) -> None:
        self.running = False

    def __repr__(self) -> str:
        try:
            url = self.url  # type: ignore[attr-defined]  # every subclass has one once its server exists
        except (AttributeError, AssertionError):
            url = "?"
        return f"{type(self).__name__}({url})"


def unknown_route_report() -> list[str]:
    """One line per stand-in that recorded unknown routes since the last report: ``"Name(url): GET /a, PUT /b"``.

    Reported routes are cleared; stand-ins that have stopped leave the registry, running ones (module- or
    session-scoped) stay and are checked again after the next test.
    """
    with _registry_lock:
        stand_ins = list(_registry)
        _registry[:] = [s for s in stand_ins if s.running]
    lines = []
    for stand_in in stand_ins:
        if routes := stand_in.take_unknown_routes():
            lines.append(f"{stand_in!r}: {', '.join(routes)}")
    return lines


class AnyMethod:
    """Mixin for a ``BaseHTTPRequestHandler``: a method with no ``do_<METHOD>`` goes to ``unknown_method``
    instead of the stock, unrecorded ``501 Unsupported method``."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self.unknown_method
        raise AttributeError(name)

    def unknown_method(self) -> None:
        """Answer a request whose method the handler does not serve (the subclass records it)."""
        raise NotImplementedError
