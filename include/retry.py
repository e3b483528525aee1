"""One retry policy for the engine's own HTTP calls (tenacity), and httpx requests sent through it.

A call is tried again only when the failure may pass: HTTP 429, 500, 502, 503 or 504, a timeout, a refused or
dropped connection. The wait before the next try is the server's ``Retry-After`` when it sends one (seconds or an
HTTP date), else an exponential backoff (``base_wait_s``, doubled each time); both are capped at ``max_wait_s``.
A call stops after ``attempts`` tries, or earlier when the next wait would pass its deadline; then the last
failure is raised (or, for :func:`send`, the last response returned) for the caller to map to its own error.

A request that is not idempotent (creating a run, posting an asset event) is tried again only when the server
surely did not act on it: the connection was never made, or it answered 429 or 503. Retrying it after a 500 or a
dropped answer could act twice.

``sleep`` is injectable, so tests record the waits instead of sleeping them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
UNSENT_STATUSES = frozenset({429, 503})  # answers that say the server did not act on the request

Predicate = Callable[[BaseException], bool]


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date); None when absent or unreadable.

    A date in the past means "now" (0 s).
    """
    text = (value or "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _httpx_status(error: BaseException) -> int | None:
    import httpx

    return error.response.status_code if isinstance(error, httpx.HTTPStatusError) else None


def is_transient(error: BaseException) -> bool:
    """True for an httpx failure that may pass: a timeout, a refused or dropped connection, HTTP 429/5xx."""
    import httpx

    if isinstance(error, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
        return True
    return _httpx_status(error) in RETRY_STATUSES


def is_unsent(error: BaseException) -> bool:
    """True for an httpx failure after which the server surely did not act: no connection, or HTTP 429/503."""
    import httpx

    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return _httpx_status(error) in UNSENT_STATUSES


def httpx_retry_after(error: BaseException) -> str | None:
    """The ``Retry-After`` header of an httpx status error, if any."""
    import httpx

    return error.response.headers.get("Retry-After") if isinstance(error, httpx.HTTPStatusError) else None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try a call again; see the module doc.

    :param attempts: tries in all (1 = no retry).
    :param base_wait_s: the first backoff wait; each next one doubles it.
    :param max_wait_s: cap of every wait, ``Retry-After`` included.
    :param sleep: how to wait (``time.sleep``; tests pass a recorder).
    """

    attempts: int = 4
    base_wait_s: float = 1.0
    max_wait_s: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def wait_s(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed try: ``Retry-After`` if given, else the backoff; capped."""
        if retry_after is not None:
            return min(retry_after, self.max_wait_s)
        return min(self.base_wait_s * 2 ** min(failures - 1, 64), self.max_wait_s)  # 2**64: no float overflow

    def call(self, fn: Callable[[], T], *, transient: Predicate = is_transient,
             retry_after: Callable[[BaseException], str | None] = httpx_retry_after, deadline: float | None = None,
             on_retry: Callable[[int, float, BaseException], None] | None = None) -> T:
        """``fn()``, tried again while ``transient(error)`` and tries are left; the last error is raised.

        ``deadline`` (``time.monotonic()`` seconds) stops the retries when the next wait would end past it.
        ``on_retry(failures, wait_s, error)`` is called before each wait (default: a warning in the log).
        """
        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            hint = retry_after_s(retry_after(error)) if error is not None else None
            return self.wait_s(state.attempt_number, hint)

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= self.attempts:
                return True
            return deadline is not None and time.monotonic() + state.upcoming_sleep >= deadline

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            if error is not None:  # always: tenacity sleeps only after a failed try
                (on_retry or _log_retry)(state.attempt_number, state.upcoming_sleep, error)

        retrying = tenacity.Retrying(stop=stop, wait=wait, retry=tenacity.retry_if_exception(transient),
                                     sleep=self.sleep, before_sleep=before_sleep, reraise=True)
        return retrying(fn)


def _log_retry(failures: int, wait: float, error: BaseException) -> None:
    log.warning("%s (try %d); trying again in %.1f s", describe(error), failures, wait)


def describe(error: BaseException) -> str:
    """A short account of an HTTP failure: ``HTTP 503 Service Unavailable`` or ``ConnectError: ...``."""
    import httpx

    if isinstance(error, httpx.HTTPStatusError):
        response = error.response
        return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def send(client: httpx.Client, method: str, url: str, *, policy: RetryPolicy, idempotent: bool = True,
         deadline: float | None = None, on_retry: Callable[[int, float, BaseException], None] | None = None,
         **kwargs: Any) -> httpx.Response:
    """``client.request(method, url, **kwargs)`` through ``policy``; the final response, whatever its status.

    Transient answers (429/5xx) are tried again while the policy allows (only 429/503 when not ``idempotent``);
    the caller maps the status of what comes back. Transport failures left after the retries are raised
    (``httpx.TransportError``). With a ``deadline`` and no ``timeout``, each try may take what is left of it.
    """
    import httpx

    def once() -> httpx.Response:
        if deadline is not None and "timeout" not in kwargs:
            response = client.request(method, url, timeout=max(deadline - time.monotonic(), 0.1), **kwargs)
        else:
            response = client.request(method, url, **kwargs)
        if response.status_code in RETRY_STATUSES:
            response.raise_for_status()
        return response

    try:
        return policy.call(once, transient=is_transient if idempotent else is_unsent, deadline=deadline,
                           on_retry=on_retry)
    except httpx.HTTPStatusError as error:
        return error.response
