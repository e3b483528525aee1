"""Start a deploy from a training job: a tiny REST client of Airflow's api-server (stdlib only, no airflow import).

Two ways, both authenticated with a JWT (``POST /auth/token`` or a token given in ``LORA_DEPLOY_AIRFLOW_TOKEN``):

* ``run``: create a dagRun of ``deploy_<model>`` with ``conf`` = adapter version (+ instance id);
* ``asset``: post an asset event on ``lora-deploy://<model>/adapter`` with the adapter version in ``extra``;
  the deploy DAG is scheduled on its cron OR that asset, so the scheduler starts a run.

Usage (the password comes from the environment, never from the command line, and is never printed)::

    export LORA_DEPLOY_AIRFLOW_URL=http://airflow:8080 LORA_DEPLOY_AIRFLOW_USERNAME=admin
    export LORA_DEPLOY_AIRFLOW_PASSWORD=...          # or LORA_DEPLOY_AIRFLOW_TOKEN=<jwt>
    python -m include.trigger run demo --adapter-version checkpoint-20 --instance-id 12345 --wait
    lora-deploy-trigger asset demo --adapter-version checkpoint-20
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from include.config.pools import PoolSettings
from include.errors import LoraDeployError

FINISHED = ("success", "failed")
CREDENTIALS_FIX = ("check LORA_DEPLOY_AIRFLOW_USERNAME / LORA_DEPLOY_AIRFLOW_PASSWORD (or a fresh "
                   "LORA_DEPLOY_AIRFLOW_TOKEN) against the api-server's users")
UNKNOWN_FIX = ("is the model in config/models.yaml, and is the dag-processor running and able to parse "
               "dags/deploy_models.py? (see the DAG's import errors in the UI)")


class TriggerError(LoraDeployError):
    """The api-server refused or could not be reached; the message says what to fix."""


def safe_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return url
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{parts.hostname}{port}").geturl()


def dag_id_for(model: str) -> str:
    """The deploy DAG of a model (the DAG factory's naming)."""
    return f"deploy_{model}"


def adapter_asset_uri(model: str) -> str:
    """The asset a training job posts to when a new adapter of ``model`` is ready."""
    return f"lora-deploy://{model}/adapter"


@dataclass
class AirflowClient:
    """Calls the api-server's REST API with a bearer token."""

    url: str
    token: str
    timeout_s: float = 30

    @classmethod
    def login(cls, url: str, username: str, password: str, timeout_s: float = 30) -> AirflowClient:
        """Get a JWT for ``username`` from ``POST /auth/token``."""
        client = cls(url=url.rstrip("/"), token="", timeout_s=timeout_s)
        try:
            answer = client.call("POST", "/auth/token", {"username": username, "password": password}, api=False)
        except TriggerError as error:
            if "HTTP 401" in error.detail or "HTTP 403" in error.detail:
                raise TriggerError(f"the api-server at {safe_url(client.url)} refused user {username!r}: bad username "
                                   "or password", fix=CREDENTIALS_FIX) from None
            raise
        client.token = answer["access_token"]
        return client

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, api: bool = True,
             model: str | None = None) -> dict[str, Any]:
        """One JSON request; HTTP and connection failures become a :class:`TriggerError` with the fix."""
        url = f"{self.url}{'/api/v2' if api else ''}{path}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            raise self._http_error(error, method, path, model) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TriggerError(f"cannot reach the Airflow api-server at {safe_url(self.url)} ({reason})", model=model,
                               fix="check LORA_DEPLOY_AIRFLOW_URL (scheme, host, port) and that "
                                   "`airflow api-server` is running and reachable from here") from None
        return json.loads(text) if text else {}

    def _http_error(self, error: urllib.error.HTTPError, method: str, path: str, model: str | None) -> TriggerError:
        detail = error.read().decode(errors="replace")[:500]
        what = f"{method} {path} answered HTTP {error.code}: {detail}"
        if error.code in (401, 403):
            return TriggerError(what, model=model, fix=CREDENTIALS_FIX)
        if error.code == 404:
            return TriggerError(what, model=model, fix=UNKNOWN_FIX)
        if error.code in (400, 422) and path.startswith("/pools"):
            return TriggerError(what, model=model, fix="the api-server refused the pool: check settings.pools "
                                                       "against the fields named above")
        if error.code in (400, 422):
            return TriggerError(what, model=model, fix="the run's conf was rejected by the DAG's params: fix the "
                                                       "values named above")
        return TriggerError(what, model=model, fix="see the api-server's log")

    def pool(self, name: str) -> dict[str, Any] | None:
        """The pool's record, or None when the installation has no pool of that name."""
        try:
            return self.call("GET", f"/pools/{urllib.parse.quote(name, safe='')}")
        except TriggerError as error:
            if "HTTP 404" in error.detail:
                return None
            raise

    def trigger_run(self, model: str, conf: dict[str, Any], now: bool = False) -> dict[str, Any]:
        """Create a dagRun of the model's deploy DAG; returns the dagRun record (``dag_run_id``, ``state``)."""
        dag_id = dag_id_for(model)
        dag = self.call("GET", f"/dags/{dag_id}", model=model)
        if dag.get("is_paused"):
            print(f"warning: {dag_id} is paused: the run is queued until the DAG is unpaused in the UI",
                  file=sys.stderr)
        logical_date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if now else None
        return self.call("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": logical_date, "conf": conf},
                         model=model)

    def asset_id(self, model: str) -> int:
        """The id of ``lora-deploy://<model>/adapter`` (``uri_pattern`` is a substring search: match exactly)."""
        uri = adapter_asset_uri(model)
        query = urllib.parse.urlencode({"uri_pattern": uri, "limit": 100})
        assets = self.call("GET", f"/assets?{query}", model=model).get("assets", [])
        for asset in assets:
            if asset.get("uri") == uri:
                return int(asset["id"])
        raise TriggerError(f"Airflow knows no asset {uri!r}", model=model, fix=UNKNOWN_FIX)

    def post_asset_event(self, model: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Post an event on the model's adapter asset; returns the event record (``id``, ``asset_id``)."""
        return self.call("POST", "/assets/events", {"asset_id": self.asset_id(model), "extra": extra}, model=model)

    def run_for_event(self, model: str, event_id: int) -> str | None:
        """The id of the dagRun that consumed asset event ``event_id``, once the scheduler created it."""
        dag_id = dag_id_for(model)
        query = urllib.parse.urlencode({"run_type": "asset_triggered", "order_by": "-run_after", "limit": 20})
        for run in self.call("GET", f"/dags/{dag_id}/dagRuns?{query}", model=model).get("dag_runs", []):
            run_id = run["dag_run_id"]
            path = f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/upstreamAssetEvents"
            try:
                events = self.call("GET", path, model=model).get("asset_events", [])
            except TriggerError as err:
                # A run the scheduler is still creating can answer 500 here for a moment: ask again next poll.
                print(f"note: {err}; asking again", file=sys.stderr)
                continue
            if any(event.get("id") == event_id for event in events):
                return run_id
        return None

    def run_state(self, model: str, run_id: str) -> str:
        """The state of one dagRun (queued, running, success, failed)."""
        path = f"/dags/{dag_id_for(model)}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
        return str(self.call("GET", path, model=model).get("state"))

    def wait(self, model: str, run_id: str, timeout_s: float, interval_s: float = 5) -> str:
        """Poll the run until it is finished; its final state, or a TriggerError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        state = self.run_state(model, run_id)
        while state not in FINISHED:
            if time.monotonic() > deadline:
                raise TriggerError(f"run {run_id} still {state} after {timeout_s:.0f} s", model=model,
                                   fix="raise --timeout, or watch the run in the Airflow UI")
            time.sleep(interval_s)
            state = self.run_state(model, run_id)
        return state


class PoolClient(Protocol):
    """What :func:`apply_pools_rest` needs of a REST client (``include.trigger.client.AirflowClient`` is one)."""

    def pool(self, name: str) -> dict[str, Any] | None:
        """The pool's record, or None when it does not exist."""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request to ``/api/v2<path>``."""


def apply_pools_rest(client: PoolClient, pools: dict[str, PoolSettings]) -> list[str]:
    """Create or resize each pool through the REST API; returns one line per pool saying what changed."""
    lines = []
    for name, pool in sorted(pools.items()):
        current = client.pool(name)
        body = {"slots": pool.slots, "description": pool.description}
        if current is None:
            client.call("POST", "/pools", {"name": name, "include_deferred": False, **body})
            lines.append(f"pool {name}: created with {pool.slots} slots")
        elif current.get("slots") != pool.slots or current.get("description") != pool.description:
            # Without an update_mask the api-server validates a whole pool: name and include_deferred too.
            client.call("PATCH", f"/pools/{quote(name, safe='')}", {"pool": name, "include_deferred": False, **body})
            lines.append(f"pool {name}: {current.get('slots')} -> {pool.slots} slots")
        else:
            lines.append(f"pool {name}: {pool.slots} slots (unchanged)")
    return lines
