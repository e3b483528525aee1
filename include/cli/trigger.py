"""``lora-deploy-trigger``: start a deploy from a training job (a run with conf, or an asset event), or apply
the config's pools, through Airflow's REST API. Exit 0 on success, 1 on a failed run, 2 on errors."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from include.config.loader import load_config
from include.errors import TriggerError
from include.trigger.client import AirflowClient, apply_pools_rest


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
            run_id = run.dag_run_id
            print(f"dag_run_id={run_id}")
        else:
            event = client.post_asset_event(args.model, _payload(args))
            print(f"asset_event_id={event.id} asset_id={event.asset_id}")
            if not args.wait:
                return 0
            deadline = time.monotonic() + args.timeout
            run_id = None
            while run_id is None:
                if time.monotonic() > deadline:
                    raise TriggerError(f"no run consumed asset event {event.id} within {args.timeout:.0f} s",
                                       model=args.model, fix="is deploy_<model> unpaused and the scheduler running?")
                time.sleep(min(args.poll, 2))
                run_id = client.run_for_event(args.model, event.id)
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
