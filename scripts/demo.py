"""Run the demo deployment through the real ``deploy_demo`` DAG and print what it produced.

Called by ``scripts/demo.sh`` inside the project's virtualenv. Uses a local Airflow home with SQLite under
``$LORA_DEPLOY_HOME`` (default ``~/.lora-deploy``); runs the DAG in-process with ``dag.test()``, so no
scheduler or other process is left running.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the demo's inputs come from the generators in tests/fixtures
STAGES = ("plan", "download", "merge", "convert", "quant_types", "quantize", "ggufs", "install", "smoke", "promote",
          "health", "rollback", "publish", "space_ready")


def configure_environment(home: Path) -> None:
    """Point Airflow and lora-deploy at the demo home (before anything imports airflow)."""
    os.environ["LORA_DEPLOY_HOME"] = str(home)
    os.environ.setdefault("AIRFLOW_HOME", str(home / "airflow"))
    os.environ.setdefault("LORA_DEPLOY_CONFIG", str(ROOT / "config" / "models.yaml"))
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")


def migrate_db() -> None:
    """Create or upgrade the demo's SQLite metadata database."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL)


def run_dag(conf: dict[str, object]) -> dict[str, object]:
    """Run deploy_demo with ``dag.test()``; return the state and every stage's XCom record."""
    from airflow.dag_processing.dagbag import BundleDagBag

    dags_dir = str(ROOT / "dags")
    bag = BundleDagBag(dag_folder=dags_dir, bundle_path=Path(dags_dir), bundle_name="dags-folder")
    if "deploy_demo" not in bag.dags:
        raise SystemExit(f"deploy_demo did not load: {bag.import_errors}")
    dag_run = bag.dags["deploy_demo"].test(run_conf=conf)
    records = {}
    for task_id in STAGES:
        tis = [ti for ti in dag_run.get_task_instances() if ti.task_id == task_id]
        states = sorted({str(ti.state) for ti in tis}) or ["none"]
        xcom = tis[0].xcom_pull(task_ids=task_id) if len(tis) == 1 else None
        records[task_id] = {"state": ",".join(states), "xcom": xcom}
    return {"state": str(dag_run.state), "records": records}


def summarize(result: dict[str, object], seconds: float) -> str:
    """Human summary: where the GGUFs went, their sizes, the health report."""
    records = result["records"]
    lines = [f"deploy_demo finished: {result['state']} in {seconds:.1f} s"]
    for task_id, record in records.items():
        xcom = record["xcom"] or {}
        reused = f" (reused: {xcom.get('reused')})" if isinstance(xcom, dict) and "reused" in xcom else ""
        lines.append(f"  {task_id:11s} {record['state']}{reused}")
    plan = records["plan"]["xcom"] or {}
    if plan.get("dry_run"):
        from include.plan import DeployPlan

        lines.append(DeployPlan.from_record(plan).text())
        lines.append("dry run: nothing was written")
    installed = (records["install"]["xcom"] or {}).get("installed", [])
    if installed:
        lines.append("GGUFs installed for LM Studio:")
        for item in installed:
            lines.append(f"  {item['quant']:7s} {item['bytes'] / 1e6:7.2f} MB  {item['path']}")
    health = records["smoke"]["xcom"]
    if health:
        lines.append(f"smoke test ({health.get('quant')}): {health['latency_s']:.2f} s latency, "
                     f"{health['tokens_per_s']:.1f} tokens/s, answer: {health.get('answer_excerpt', '')[:60]!r}")
        free = health.get("disk_free_bytes") or {}
        lines.append(f"free disk: models dir {free.get('models_dir', 0) / 1e9:.1f} GB, artifact root "
                     f"{free.get('artifact_root', 0) / 1e9:.1f} GB; free memory "
                     f"{(health.get('mem_available_bytes') or 0) / 1e9:.1f} GB")
    promote = records["promote"]["xcom"]
    if promote:
        lines.append(f"LM Studio current: {promote['version'] if promote['promoted'] else promote.get('previous')}"
                     f" ({promote['reason']})")
    return "\n".join(lines)


def main() -> int:
    """Prepare the demo inputs, run the DAG, print the summary; exit 1 when the run failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("LORA_DEPLOY_HOME", "~/.lora-deploy")))
    parser.add_argument("--adapter-version", default=None, help="checkpoint to deploy (default: the newest)")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--dry-run", action="store_true", help="resolve, check and print the plan; write nothing")
    parser.add_argument("--promote", action="store_true", help="make this version current even if it is older")
    parser.add_argument("--quant-types", default=None, help="comma-separated llama.cpp types (default: config)")
    args = parser.parse_args()
    home = args.home.expanduser().resolve()
    configure_environment(home)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from tests.fixtures.demo_inputs import prepare_demo

    started = time.monotonic()
    paths = prepare_demo(home)
    print(f"demo inputs ready under {paths.home / 'demo'}", flush=True)
    migrate_db()
    conf: dict[str, object] = {"adapter_version": args.adapter_version, "force": args.force,
                               "dry_run": args.dry_run, "promote": args.promote}
    if args.quant_types:
        conf["quant_types"] = [t.strip().upper() for t in args.quant_types.split(",") if t.strip()]
    result = run_dag(conf)
    print(summarize(result, time.monotonic() - started))
    return 0 if result["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
