"""Start a deploy from a training job: a client of Airflow's REST API on the official typed client.

The calls go through ``apache-airflow-client`` (pinned to the Airflow version, 3.3.2): ``DAGApi``, ``DagRunApi``,
``AssetApi`` and ``PoolApi`` with their request and response models, so a body the api-server would refuse is
caught by the models before it is sent. Two ways to start a deploy, both authenticated with a JWT
(``POST /auth/token`` or a token given in ``LORA_DEPLOY_AIRFLOW_TOKEN``):

* ``run``: create a dagRun of ``deploy_<model>`` with ``conf`` = adapter version (+ instance id);
* ``asset``: post an asset event on ``lora-deploy://<model>/adapter`` with the adapter version in ``extra``;
  the deploy DAG is scheduled on its cron OR that asset, so the scheduler starts a run.

``POST /auth/token`` belongs to the simple auth manager, not to the REST API the typed client is generated
from, so the login is one hand-written httpx request. Every call goes through the engine's retry policy
(:mod:`include.retry`): reads are tried again on 429/5xx, timeouts and dropped connections; a dagRun or an
asset event is posted again only when the api-server surely did not act on it (no connection, 429 or 503),
so a retry never starts a deploy twice.

Usage (the password comes from the environment, never from the command line, and is never printed)::

    export LORA_DEPLOY_AIRFLOW_URL=http://airflow:8080 LORA_DEPLOY_AIRFLOW_USERNAME=admin
    export LORA_DEPLOY_AIRFLOW_PASSWORD=...          # or LORA_DEPLOY_AIRFLOW_TOKEN=<jwt>
    python -m include.trigger run demo --adapter-version checkpoint-20 --instance-id 12345 --wait
    lora-deploy-trigger asset demo --adapter-version checkpoint-20
"""

from __future__ import annotations

import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Protocol, TypeVar

import httpx
import urllib3.exceptions  # only to classify the typed client's transport failures (its transport is urllib3)
from airflow_client.client import ApiClient, Configuration
from airflow_client.client.api import AssetApi, DAGApi, DagRunApi, PoolApi
from airflow_client.client.exceptions import ApiException
from airflow_client.client.models import (
    AssetEventResponse,
    CreateAssetEventsBody,
    DAGRunResponse,
    PoolBody,
    PoolPatchBody,
    PoolResponse,
    TriggerDAGRunPostBody,
)

from include.config.pools import PoolSettings
from include.errors import TriggerError
from include.retry import RETRY_STATUSES, UNSENT_STATUSES, RetryPolicy, send

T = TypeVar("T")
FINISHED = ("success", "failed")
CREDENTIALS_FIX = ("check LORA_DEPLOY_AIRFLOW_USERNAME / LORA_DEPLOY_AIRFLOW_PASSWORD (or a fresh "
                   "LORA_DEPLOY_AIRFLOW_TOKEN) against the api-server's users")
UNKNOWN_FIX = ("is the model in config/models.yaml, and is the dag-processor running and able to parse "
               "dags/deploy_models.py? (see the DAG's import errors in the UI)")
UNREACHABLE_FIX = ("check LORA_DEPLOY_AIRFLOW_URL (scheme, host, port) and that `airflow api-server` is running "
                   "and reachable from here")


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


def _reason(error: BaseException) -> str:
    """The operating system's words for a failed connection ("Connection refused"), else the error's text."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(error) or type(error).__name__


def _transient(error: BaseException) -> bool:
    """A typed-client failure worth another try: HTTP 429/5xx, a timeout, a refused or dropped connection."""
    if isinstance(error, ApiException):
        return error.status in RETRY_STATUSES
    return isinstance(error, urllib3.exceptions.TimeoutError | urllib3.exceptions.ProtocolError)


def _unsent(error: BaseException) -> bool:
    """A typed-client failure after which the api-server surely did not act: no connection, HTTP 429 or 503."""
    if isinstance(error, ApiException):
        return error.status in UNSENT_STATUSES
    return isinstance(error, urllib3.exceptions.ConnectTimeoutError)  # NewConnectionError is one


def _retry_after(error: BaseException) -> str | None:
    headers = getattr(error, "headers", None)
    return headers.get("Retry-After") if headers else None


def _note_retry(failures: int, wait: float, error: BaseException) -> None:
    if isinstance(error, ApiException | httpx.HTTPStatusError):
        status = error.status if isinstance(error, ApiException) else error.response.status_code
        what = f"the api-server answered HTTP {status}"
    else:
        what = f"cannot reach the api-server: {_reason(error)}"
    print(f"note: {what} (try {failures}); trying again in {wait:.1f} s", file=sys.stderr)


@dataclass
class AirflowClient:
    """Calls the api-server's REST API with a bearer token through the typed client (see the module doc)."""

    url: str
    token: str = field(repr=False)  # a bearer token: never in a repr, a log line or a message
    timeout_s: float = 30
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def login(cls, url: str, username: str, password: str, timeout_s: float = 30,
              retry: RetryPolicy | None = None) -> AirflowClient:
        """Get a JWT for ``username`` from ``POST /auth/token`` (the simple auth manager's; not in the typed client)."""
        client = cls(url=url.rstrip("/"), token="", timeout_s=timeout_s, **({"retry": retry} if retry else {}))
        try:
            with httpx.Client(timeout=timeout_s) as http:
                answer = send(http, "POST", f"{client.url}/auth/token", policy=client.retry, on_retry=_note_retry,
                              json={"username": username, "password": password})
        except httpx.HTTPError as error:
            raise client._unreachable(error, None) from error
        if answer.status_code in (401, 403):
            raise TriggerError(f"the api-server at {safe_url(client.url)} refused user {username!r}: bad username or "
                               "password", fix=CREDENTIALS_FIX)
        if answer.status_code == 404:
            raise TriggerError(f"the api-server at {safe_url(client.url)} has no POST /auth/token (HTTP 404)",
                               fix="another auth manager guards this Airflow: give a JWT in LORA_DEPLOY_AIRFLOW_TOKEN "
                                   "instead of a password, or check LORA_DEPLOY_AIRFLOW_URL")
        if answer.is_error:
            raise TriggerError(f"POST /auth/token answered HTTP {answer.status_code}: {answer.text[:500]}",
                               fix="see the api-server's log")
        client.token = answer.json()["access_token"]
        return client

    @cached_property
    def _api(self) -> ApiClient:
        """The typed client: urllib3's own retries off (the retry policy is the only one)."""
        return ApiClient(Configuration(host=self.url, access_token=self.token, retries=False))

    def _call(self, what: str, fn: Callable[[], T], *, model: str | None = None, idempotent: bool = True,
              absent_ok: bool = False) -> T:
        """``fn()`` (one typed-client call, worded ``what`` in errors) through the retry policy; failures mapped.

        ``absent_ok``: HTTP 404 returns None instead of raising.
        """
        try:
            return self.retry.call(fn, transient=_transient if idempotent else _unsent, retry_after=_retry_after,
                                   on_retry=_note_retry)
        except ApiException as error:
            if absent_ok and error.status == 404:
                return None  # type: ignore[return-value]
            if not error.status:  # the client wraps TLS failures as status 0
                raise self._unreachable(error, model) from error
            raise self._http_error(error, what, model) from error
        except urllib3.exceptions.HTTPError as error:
            raise self._unreachable(error, model) from error

    def _unreachable(self, error: BaseException, model: str | None) -> TriggerError:
        return TriggerError(f"cannot reach the Airflow api-server at {safe_url(self.url)} ({_reason(error)})",
                            model=model, fix=UNREACHABLE_FIX)

    @staticmethod
    def _http_error(error: ApiException, what: str, model: str | None) -> TriggerError:
        detail = f"{what} answered HTTP {error.status}: {(error.body or error.reason or '')[:500]}"
        if error.status in (401, 403):
            return TriggerError(detail, model=model, fix=CREDENTIALS_FIX)
        if error.status == 404:
            return TriggerError(detail, model=model, fix=UNKNOWN_FIX)
        if error.status in (400, 422) and " /pools" in what:
            return TriggerError(detail, model=model, fix="the api-server refused the pool: check settings.pools "
                                                         "against the fields named above")
        if error.status in (400, 422):
            return TriggerError(detail, model=model, fix="the run's conf was rejected by the DAG's params: fix the "
                                                         "values named above")
        return TriggerError(detail, model=model, fix="see the api-server's log")

    # --- runs and asset events ------------------------------------------------------------------------------
    def trigger_run(self, model: str, conf: dict[str, Any], now: bool = False) -> DAGRunResponse:
        """Create a dagRun of the model's deploy DAG; returns the dagRun (``dag_run_id``, ``state``)."""
        dag_id, timeout = dag_id_for(model), self.timeout_s
        dag = self._call(f"GET /dags/{dag_id}", lambda: DAGApi(self._api).get_dag(dag_id, _request_timeout=timeout),
                         model=model)
        if dag.is_paused:
            print(f"warning: {dag_id} is paused: the run is queued until the DAG is unpaused in the UI",
                  file=sys.stderr)
        body = TriggerDAGRunPostBody(conf=conf, logical_date=datetime.now(UTC).replace(microsecond=0) if now else None)
        return self._call(f"POST /dags/{dag_id}/dagRuns",
                          lambda: DagRunApi(self._api).trigger_dag_run(dag_id, body, _request_timeout=timeout),
                          model=model, idempotent=False)

    def asset_id(self, model: str) -> int:
        """The id of ``lora-deploy://<model>/adapter`` (``uri_pattern`` is a substring search: match exactly)."""
        uri = adapter_asset_uri(model)
        found = self._call("GET /assets", lambda: AssetApi(self._api).get_assets(
            uri_pattern=uri, limit=100, _request_timeout=self.timeout_s), model=model)
        for asset in found.assets:
            if asset.uri == uri:
                return asset.id
        raise TriggerError(f"Airflow knows no asset {uri!r}", model=model, fix=UNKNOWN_FIX)

    def post_asset_event(self, model: str, extra: dict[str, Any]) -> AssetEventResponse:
        """Post an event on the model's adapter asset; returns the event (``id``, ``asset_id``)."""
        body = CreateAssetEventsBody(asset_id=self.asset_id(model), extra=extra)
        return self._call("POST /assets/events", lambda: AssetApi(self._api).create_asset_event(
            body, _request_timeout=self.timeout_s), model=model, idempotent=False)

    def run_for_event(self, model: str, event_id: int) -> str | None:
        """The id of the dagRun that consumed asset event ``event_id``, once the scheduler created it."""
        dag_id, runs_api = dag_id_for(model), DagRunApi(self._api)
        runs = self._call(f"GET /dags/{dag_id}/dagRuns", lambda: runs_api.get_dag_runs(
            dag_id, run_type=["asset_triggered"], order_by=["-run_after"], limit=20,
            _request_timeout=self.timeout_s), model=model)
        for run in runs.dag_runs:
            run_id = run.dag_run_id
            try:
                events = self._call(f"GET /dags/{dag_id}/dagRuns/{run_id}/upstreamAssetEvents",
                                    lambda run_id=run_id: runs_api.get_upstream_asset_events(
                                        dag_id, run_id, _request_timeout=self.timeout_s), model=model)
            except TriggerError as err:
                # A run the scheduler is still creating can answer 500 here for a moment: ask again next poll.
                print(f"note: {err}; asking again", file=sys.stderr)
                continue
            if any(event.id == event_id for event in events.asset_events):
                return run_id
        return None

    def run_state(self, model: str, run_id: str) -> str:
        """The state of one dagRun (queued, running, success, failed)."""
        dag_id = dag_id_for(model)
        run = self._call(f"GET /dags/{dag_id}/dagRuns/{run_id}", lambda: DagRunApi(self._api).get_dag_run(
            dag_id, run_id, _request_timeout=self.timeout_s), model=model)
        return str(run.state.value)

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

    # --- pools ----------------------------------------------------------------------------------------------
    def pool(self, name: str) -> PoolResponse | None:
        """The pool, or None when the installation has no pool of that name."""
        return self._call(f"GET /pools/{name}", lambda: PoolApi(self._api).get_pool(
            name, _request_timeout=self.timeout_s), absent_ok=True)

    def create_pool(self, name: str, pool: PoolSettings) -> PoolResponse:
        """``POST /pools``: a new pool with the settings' slots and description (deferred tasks not counted)."""
        body = PoolBody(name=name, slots=pool.slots, description=pool.description, include_deferred=False)
        return self._call("POST /pools", lambda: PoolApi(self._api).post_pool(body, _request_timeout=self.timeout_s),
                          idempotent=False)

    def resize_pool(self, name: str, pool: PoolSettings) -> PoolResponse:
        """``PATCH /pools/<name>`` with the whole pool: the api-server validates every field of a pool's PATCH
        (name and include_deferred too), with or without ``update_mask``."""
        body = PoolPatchBody(pool=name, slots=pool.slots, description=pool.description, include_deferred=False)
        return self._call(f"PATCH /pools/{name}", lambda: PoolApi(self._api).patch_pool(
            name, body, _request_timeout=self.timeout_s))


class PoolClient(Protocol):
    """What :func:`apply_pools_rest` needs of a REST client (:class:`AirflowClient` is one)."""

    def pool(self, name: str) -> PoolResponse | None:
        """The pool, or None when it does not exist."""

    def create_pool(self, name: str, pool: PoolSettings) -> Any:
        """Create the pool."""

    def resize_pool(self, name: str, pool: PoolSettings) -> Any:
        """Set the pool's slots and description."""


def apply_pools_rest(client: PoolClient, pools: dict[str, PoolSettings]) -> list[str]:
    """Create or resize each pool through the REST API; returns one line per pool saying what changed."""
    lines = []
    for name, pool in sorted(pools.items()):
        current = client.pool(name)
        if current is None:
            client.create_pool(name, pool)
            lines.append(f"pool {name}: created with {pool.slots} slots")
        elif current.slots != pool.slots or current.description != pool.description:
            client.resize_pool(name, pool)
            lines.append(f"pool {name}: {current.slots} -> {pool.slots} slots")
        else:
            lines.append(f"pool {name}: {pool.slots} slots (unchanged)")
    return lines
