"""A small Vast.ai REST client: instance id -> status and SSH endpoint.

Only what the download stage needs: ``GET /api/v0/instances/{id}/?owner=me`` with
``Authorization: Bearer <key>``. The SSH endpoint is chosen as the ``vastai ssh-url`` command does:
``public_ipaddr`` + ``ports["22/tcp"][0]["HostPort"]`` (a direct connection) when the instance publishes
it, else the proxy ``ssh_host:ssh_port``.

Errors a retry cannot fix (bad key, unknown instance, instance not running) raise :class:`VastAIError`
(non-retryable: the task fails at once). Transient ones (timeouts, refused or dropped connections, HTTP 429 and
5xx, an answer that is not JSON) are retried here by the engine's retry policy (:mod:`include.retry`: httpx,
``Retry-After`` honoured, else exponential backoff), then raise :class:`VastAITransientError`, which the Airflow
layer leaves to the task's retry policy. The API key never appears in messages or logs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from include.errors import VastAIError, VastAITransientError
from include.retry import RETRY_STATUSES, RetryPolicy, describe, is_transient

log = logging.getLogger(__name__)

DEFAULT_URL = "https://console.vast.ai"
API_KEY_ENV = "VAST_API_KEY"
URL_ENV = "VAST_URL"
MAX_WAIT_S = 60.0


class _NotJSON(ValueError):
    """A 2xx answer whose body is not JSON (a proxy's error page): worth another try."""


@dataclass(frozen=True)
class VastInstance:
    """What the API says about one instance: its status and where its sshd listens."""

    id: str
    actual_status: str
    ssh_host: str
    ssh_port: int
    direct: bool

    @property
    def running(self) -> bool:
        """True when the instance is up (``actual_status == "running"``)."""
        return self.actual_status == "running"


def resolve_api_key(connection_password: str | None) -> str:
    """The API key: the connection's password field, else ``$VAST_API_KEY``."""
    key = (connection_password or "").strip() or os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise VastAIError("no Vast.ai API key: the connection 'vastai_default' has no password and "
                          f"{API_KEY_ENV} is not set",
                          fix="create the connection (password = your API key from cloud.vast.ai/account) or set "
                              f"{API_KEY_ENV} for the workers")
    return key


def resolve_base_url(explicit: str | None = None, connection_host: str | None = None) -> str:
    """The API base URL: the explicit setting, else the connection's host, else ``$VAST_URL``, else the public API."""
    for candidate in (explicit, connection_host, os.environ.get(URL_ENV)):
        if candidate and candidate.strip():
            url = candidate.strip().rstrip("/")
            return url if "://" in url else f"https://{url}"
    return DEFAULT_URL


def ssh_endpoint(info: dict[str, Any]) -> tuple[str, int, bool]:
    """``(host, port, direct)`` of an instance record, preferring the direct public port like ``vastai ssh-url``."""
    ports = info.get("ports") or {}
    mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
    public = info.get("public_ipaddr")
    if public and mapped and isinstance(mapped, list) and mapped[0].get("HostPort"):
        return str(public).strip(), int(mapped[0]["HostPort"]), True
    host, port = info.get("ssh_host"), info.get("ssh_port")
    if not host or not port:
        raise VastAIError(f"instance {info.get('id')!r} publishes no SSH endpoint (no public 22/tcp port and no "
                          "ssh_host/ssh_port)",
                          fix="start the instance with SSH access (launch mode ssh or jupyter+ssh)")
    return str(host), int(port), False


class VastAIClient:
    """Reads instance records from the Vast.ai API (httpx; transient failures retried by :class:`RetryPolicy`).

    ``attempts`` tries in all, waiting ``backoff_s``, then twice that, ... (or the API's ``Retry-After``), at most
    MAX_WAIT_S each; ``sleep`` is injectable so tests record the waits.
    """

    def __init__(self, api_key: str, base_url: str = DEFAULT_URL, *, timeout_s: float = 30, attempts: int = 4,
                 backoff_s: float = 1.0, sleep: Callable[[float], None] | None = None) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.policy = RetryPolicy(attempts=max(1, attempts), base_wait_s=backoff_s, max_wait_s=MAX_WAIT_S,
                                  sleep=sleep or time.sleep)

    def __repr__(self) -> str:
        return f"VastAIClient(base_url={self.base_url!r})"  # never the key

    def instance(self, instance_id: str | int) -> VastInstance:
        """The instance's status and SSH endpoint; raises when it is unknown."""
        ident = str(instance_id).strip()
        if not ident.isdigit():
            raise VastAIError(f"instance id {ident!r} is not a number",
                              fix="use the numeric id `vastai show instances` prints")
        body = self._get(f"/api/v0/instances/{ident}/", {"owner": "me"}, what=f"instance {ident}")
        info = body.get("instances") if isinstance(body, dict) else None
        if not info:
            raise VastAIError(f"Vast.ai knows no instance {ident!r} on this account",
                              fix="check source.instance_id against `vastai show instances` (a destroyed instance "
                                  "is gone for good)")
        host, port, direct = ssh_endpoint(info)
        return VastInstance(id=ident, actual_status=str(info.get("actual_status") or "unknown"), ssh_host=host,
                            ssh_port=port, direct=direct)

    def running_instance(self, instance_id: str | int) -> VastInstance:
        """The instance, or a non-retryable error naming its actual status when it is not running."""
        instance = self.instance(instance_id)
        if not instance.running:
            raise VastAIError(f"Vast.ai instance {instance.id} is not running (actual_status "
                              f"{instance.actual_status!r})",
                              fix=f"start it (`vastai start instance {instance.id}`) and trigger the run again; "
                                  "the checkpoints stay on its disk while it is stopped")
        return instance

    def _get(self, path: str, query: dict[str, str], *, what: str) -> Any:
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}

        def once(client: httpx.Client) -> Any:
            response = client.get(f"{self.base_url}{path}", params=query, headers=headers)
            if response.status_code in RETRY_STATUSES:
                response.raise_for_status()
            if response.is_error:
                raise self._refused(response.status_code, what)
            try:
                return response.json() if response.content else {}
            except ValueError as err:
                raise _NotJSON(f"an answer that is not JSON ({err})") from err

        def log_retry(failures: int, wait: float, error: BaseException) -> None:
            log.warning("Vast.ai API: %s reading %s (attempt %d/%d); retrying in %.1f s", _problem(error), what,
                        failures, self.policy.attempts, wait)

        with httpx.Client(timeout=self.timeout_s) as client:
            try:
                return self.policy.call(lambda: once(client), on_retry=log_retry,
                                        transient=lambda e: isinstance(e, _NotJSON) or is_transient(e))
            except (httpx.HTTPError, _NotJSON) as err:
                if not isinstance(err, _NotJSON) and not is_transient(err):
                    raise VastAIError(f"cannot call the Vast.ai API at {self.base_url} reading {what}: "
                                      f"{_problem(err)}", fix="check the API URL (scheme, host)") from err
                raise VastAITransientError(f"the Vast.ai API at {self.base_url} failed {self.policy.attempts} times "
                                           f"reading {what}; last: {_problem(err)}",
                                           fix="the task retries later; check https://status.vast.ai if it "
                                               "persists") from err

    @staticmethod
    def _refused(status: int, what: str) -> VastAIError:
        """The non-retryable error of an HTTP status that is not transient."""
        if status in (401, 403):
            return VastAIError(f"the Vast.ai API rejected the API key (HTTP {status}) reading {what}",
                               fix="put a valid key in the password of connection 'vastai_default' (or "
                                   "VAST_API_KEY)")
        if status == 404:
            return VastAIError(f"Vast.ai knows no {what} (HTTP 404)",
                               fix="check source.instance_id against `vastai show instances`")
        return VastAIError(f"the Vast.ai API answered HTTP {status} reading {what}",
                           fix="check the API URL and the instance id")


def _problem(error: BaseException) -> str:
    """What went wrong in one try, without the request URL (it carries no secret, but is long)."""
    if isinstance(error, httpx.HTTPStatusError):
        return f"HTTP {error.response.status_code}"
    return str(error) if isinstance(error, _NotJSON) else describe(error)
