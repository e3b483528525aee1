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

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-deploy-trigger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("LORA_DEPLOY_AIRFLOW_URL", "http://127.0.0.1:8080"),
                        help="api-server URL (env LORA_DEPLOY_AIRFLOW_URL)")
    parser.add_argument("--username", default=os.environ.get("LORA_DEPLOY_AIRFLOW_USERNAME", "admin"),
                        help="user (env LORA_DEPLOY_AIRFLOW_USERNAME); the password is read from env "
                             "LORA_DEPLOY_AIRFLOW_PASSWORD, or give a JWT in LORA_DEPLOY_AIRFLOW_TOKEN")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits for the run")
    parser.add_argument("--poll", type=float, default=5, help="seconds between polls with --wait")
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, help_text in (("run", "create a dagRun of deploy_<model> with conf"),
                            ("asset", "post an event on lora-deploy://<model>/adapter")):
        command = sub.add_parser(mode, help=help_text)
        command.add_argument("model", help="model name, as in config/models.yaml")
        command.add_argument("--adapter-version", required=(mode == "asset"),
                             help="adapter version to deploy (run: default = newest)")
        command.add_argument("--instance-id", help="Vast.ai instance the adapter is on (optional)")
        command.add_argument("--wait", action="store_true", help="wait for the run; exit 0 on success, 1 if not")
        if mode == "run":
            command.add_argument("--now", action="store_true", help="logical_date = now (default: none)")
            command.add_argument("--dry-run", action="store_true",
                                 help="conf dry_run: the run logs its plan (version, outputs, disk) and writes nothing")
            command.add_argument("--force", action="store_true", help="conf force: deploy even if already deployed")
            command.add_argument("--promote", action="store_true",
                                 help="conf promote: make this version current even if a newer one is")
    pools = sub.add_parser("pools", help="create or resize the pools of settings.pools (the heavy stages' budget)")
    pools.add_argument("--config", help="config file (default: $LORA_DEPLOY_CONFIG or config/models.yaml)")
    return parser


def _client(args: argparse.Namespace) -> AirflowClient:
    token = os.environ.get("LORA_DEPLOY_AIRFLOW_TOKEN")
    if token:
        return AirflowClient(url=args.url.rstrip("/"), token=token)
    password = os.environ.get("LORA_DEPLOY_AIRFLOW_PASSWORD")
    if password is None:
        raise TriggerError("no credentials: neither LORA_DEPLOY_AIRFLOW_PASSWORD nor LORA_DEPLOY_AIRFLOW_TOKEN "
                           "is set", fix="export one of them (never pass secrets on the command line)")
    return AirflowClient.login(args.url, args.username, password)


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if args.adapter_version:
        payload["adapter_version"] = args.adapter_version
    if args.instance_id:
        payload["instance_id"] = args.instance_id
    for flag in ("dry_run", "force", "promote"):
        if getattr(args, flag, False):
            payload[flag] = True
    return payload


def _apply_pools(client: AirflowClient, config: str | None) -> int:
    from include.config import load_config
    from include.pools import apply_pools_rest

    pools = load_config(Path(config) if config else None).settings.pools
    if not pools:
        print("settings.pools is empty: nothing to apply", file=sys.stderr)
    for line in apply_pools_rest(client, pools):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints the dag_run_id / asset event id; 0 on success, 1 on a failed run, 2 on errors."""
    args = _parser().parse_args(argv)
    try:
        client = _client(args)
        if args.mode == "pools":
            return _apply_pools(client, args.config)
        if args.mode == "run":
            run = client.trigger_run(args.model, _payload(args), now=args.now)
            run_id = run["dag_run_id"]
            print(f"dag_run_id={run_id}")
        else:
            event = client.post_asset_event(args.model, _payload(args))
            print(f"asset_event_id={event['id']} asset_id={event['asset_id']}")
            if not args.wait:
                return 0
            deadline = time.monotonic() + args.timeout
            run_id = None
            while run_id is None:
                if time.monotonic() > deadline:
                    raise TriggerError(f"no run consumed asset event {event['id']} within {args.timeout:.0f} s",
                                       model=args.model, fix="is deploy_<model> unpaused and the scheduler running?")
                time.sleep(min(args.poll, 2))
                run_id = client.run_for_event(args.model, int(event["id"]))
            print(f"dag_run_id={run_id}")
        if not args.wait:
            return 0
        state = client.wait(args.model, run_id, args.timeout, args.poll)
        print(f"state={state}")
        return 0 if state == "success" else 1
    except TriggerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
