"""A small Vast.ai REST client: instance id -> status and SSH endpoint.

Only what the download stage needs: ``GET /api/v0/instances/{id}/?owner=me`` with
``Authorization: Bearer <key>``. The SSH endpoint is chosen as the ``vastai ssh-url`` command does:
``public_ipaddr`` + ``ports["22/tcp"][0]["HostPort"]`` (a direct connection) when the instance publishes
it, else the proxy ``ssh_host:ssh_port``.

Errors a retry cannot fix (bad key, unknown instance, instance not running) raise :class:`VastAIError`
(non-retryable: the task fails at once). Transient ones (timeouts, refused connections, HTTP 429 and
5xx) are retried here with exponential backoff, then raise :class:`VastAITransientError`, which the
Airflow layer leaves to the task's retry policy. The API key never appears in messages or logs.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from include.errors import VastAIError, VastAITransientError

log = logging.getLogger(__name__)

DEFAULT_URL = "https://console.vast.ai"
API_KEY_ENV = "VAST_API_KEY"
URL_ENV = "VAST_URL"
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


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
    """Reads instance records from the Vast.ai API (stdlib HTTP, retries transient failures)."""

    def __init__(self, api_key: str, base_url: str = DEFAULT_URL, *, timeout_s: float = 30, attempts: int = 4,
                 backoff_s: float = 1.0, sleep: Callable[[float], None] | None = None) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self._sleep = sleep or (lambda seconds: time.sleep(seconds))

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
        url = f"{self.base_url}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self._api_key}",
                                                       "Accept": "application/json"})
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read() or b"{}")
            except urllib.error.HTTPError as err:
                status = err.code
                retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
                err.close()
                if status in (401, 403):
                    raise VastAIError(f"the Vast.ai API rejected the API key (HTTP {status}) reading {what}",
                                      fix="put a valid key in the password of connection 'vastai_default' (or "
                                          "VAST_API_KEY)") from None
                if status == 404:
                    raise VastAIError(f"Vast.ai knows no {what} (HTTP 404)",
                                      fix="check source.instance_id against `vastai show instances`") from None
                if status not in _TRANSIENT_STATUS:
                    raise VastAIError(f"the Vast.ai API answered HTTP {status} reading {what}",
                                      fix="check the API URL and the instance id") from None
                problem = f"HTTP {status}"
                delay = max(delay, retry_after or 0)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                problem = type(err).__name__ + (f" ({err.reason})" if isinstance(err, urllib.error.URLError) else "")
            except ValueError as err:
                problem = f"an answer that is not JSON ({err})"
            if attempt == self.attempts:
                raise VastAITransientError(f"the Vast.ai API at {self.base_url} failed {self.attempts} times reading "
                                           f"{what}; last: {problem}",
                                           fix="the task retries later; check https://status.vast.ai if it persists")
            log.warning("Vast.ai API: %s reading %s (attempt %d/%d); retrying in %.1f s", problem, what, attempt,
                        self.attempts, delay)
            self._sleep(delay)
            delay = delay * 2 if delay else 0
        raise AssertionError("unreachable")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 300.0) if value else None
    except ValueError:
        return None
