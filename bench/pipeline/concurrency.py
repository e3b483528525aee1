"""Three models deploying at once on one machine: without a pool, then with a memory pool on the heavy stages.

    .venv/bin/python bench/pipeline/concurrency.py [--size 0p5b|tiny] [--models 3] [--budget-mb N]

The models are bench/pipeline's (~0.5B bf16 Llama + r=16 LoRA on the loopback sshd box), three entries of
one config with the fidelity gate off and Q4_K_M, Q5_K_M, Q8_0 each. Two runs, each in a fresh local
Airflow (LocalExecutor, 4 task slots, SQLite) and a fresh artifact store, triggered through the REST API:

1. **no pool**: the heavy tasks (merge, convert, quantize, smoke) of all models run as soon as a slot is free;
   this run measures each heavy stage's peak RSS (its process tree).
2. **memory pool**: ``settings.pools.lora_deploy_heavy.slots`` = the budget in MB (``--budget-mb``, default
   twice the largest heavy peak of run 1, rounded up to 100 MB) and every heavy task takes
   ``heavy_pool_slots`` = that largest peak; ``lora-deploy-trigger pools`` creates the pool.

Writes bench/results/concurrency.json and prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "merge")]

import yaml  # noqa: E402

from tests.e2e.concurrent_deploys import HEAVY  # noqa: E402


def _pipeline_bench() -> Any:
    """bench/pipeline/run.py as a module (bench/merge has a run.py too, so not by name on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline_run", Path(__file__).with_name("run.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PIPELINE = _pipeline_bench()
QUANTS = PIPELINE.QUANTS

POOL = "lora_deploy_heavy"
PASSWORD = "bench-concurrency"


def write_config(path: Path, base: Path, box: Path, work: Path, models: int, pool: tuple[int, int] | None) -> Path:
    """``models`` entries on one training box; with ``pool`` = (budget MB, MB per heavy task) a memory pool."""
    entries = {}
    for i in range(models):
        entry: dict[str, Any] = {
            "base_model": str(base), "source": {"kind": "ssh", "ssh_conn_id": "bench_box", "remote_dir": str(box)},
            "quantize": {"types": QUANTS}, "fidelity": {"enabled": False},
            "lmstudio": {"models_dir": str(work / f"lmstudio-{i}"), "publisher": "bench"},
            "notify": {"slack_conn_id": None}}
        if pool:
            entry["workers"] = {"heavy_pool": POOL, "heavy_pool_slots": pool[1]}
        entries[f"bench{i}"] = entry
    settings: dict[str, Any] = {"artifact_root": str(work / "artifacts")}
    if pool:
        settings["pools"] = {POOL: {"slots": pool[0]}}
    path.write_text(yaml.safe_dump({"settings": settings, "models": entries}))
    return path


def one_run(sshd: Any, config: Path, work: Path, models: int, pooled: bool) -> dict[str, Any]:
    """A fresh Airflow on ``config``; (pools applied); every model triggered at once; the report."""
    from tests.e2e.airflow_services import airflow_services
    from tests.e2e.concurrent_deploys import deploy_at_once

    services = airflow_services(work / "airflow", {"LORA_DEPLOY_CONFIG": str(config),
                                                   "AIRFLOW_CONN_BENCH_BOX": sshd.airflow_conn()}, password=PASSWORD)
    services.start()
    try:
        if pooled:
            env = {**os.environ, "LORA_DEPLOY_AIRFLOW_URL": services.url, "LORA_DEPLOY_AIRFLOW_PASSWORD": PASSWORD,
                   "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-m", "include.trigger", "pools", "--config", str(config)], env=env,
                           check=True)
        report = deploy_at_once(services, [f"deploy_bench{i}" for i in range(models)], timeout_s=3600,
                                anonymous=False)  # RSS, as docs/benchmarks.md reports it
    finally:
        services.stop()
    report.pop("heavy")
    if set(report["states"].values()) != {"success"}:
        raise SystemExit(f"not every run succeeded: {report['states']}")
    return report


def main() -> int:
    """Run without and with the pool; write results; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0p5b", choices=["0p5b", "tiny"])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--budget-mb", type=int, help="the pool's slots (default: 2 x the largest heavy peak)")
    args = parser.parse_args()
    from tests.stand_ins.sshd import start_sshd

    work = Path(tempfile.mkdtemp(prefix="lora-deploy-concurrency-"))
    sshd = start_sshd(work / "sshd")
    try:
        base, box = PIPELINE.prepare(args.size, work)
        (work / "free").mkdir()
        free = write_config(work / "free" / "models.yaml", base, box, work / "free", args.models, None)
        unpooled = one_run(sshd, free, work / "free", args.models, pooled=False)
        print(f"no pool: {json.dumps(unpooled)}", flush=True)
        heavy_peak = max(unpooled["task_peak_mb"][s] for s in HEAVY)
        task_mb = int(math.ceil(heavy_peak / 100) * 100)
        budget = args.budget_mb or 2 * task_mb
        (work / "pool").mkdir()
        pooled_config = write_config(work / "pool" / "models.yaml", base, box, work / "pool", args.models,
                                     (budget, task_mb))
        pooled = one_run(sshd, pooled_config, work / "pool", args.models, pooled=True)
        print(f"pool: {json.dumps(pooled)}", flush=True)
    finally:
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)
    results = {"command": "python bench/pipeline/concurrency.py " + " ".join(sys.argv[1:]), "size": args.size,
               "models": args.models, "cpus": os.cpu_count(), "budget_mb": budget, "heavy_pool_slots": task_mb,
               "no_pool": unpooled, "pool": pooled,
               "heavy_peak_within_budget": pooled["heavy_peak_mb"] <= budget}
    suffix = "" if args.size == "0p5b" else f"-{args.size}"
    (ROOT / "bench" / "results" / f"concurrency{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| | wall (s) | heavy tasks at once (max) | heavy tasks' peak RSS (MB) | all Airflow processes' peak "
          "RSS (MB) |\n|---|---|---|---|---|")
    for label, report in (("no pool", unpooled), (f"memory pool ({budget} MB, {task_mb} per task)", pooled)):
        print(f"| {label} | {report['wall_s']} | {report['max_concurrent_heavy']} | {report['heavy_peak_mb']} | "
              f"{report['airflow_peak_mb']} |")
    print(f"\nper-stage peak RSS (MB), no pool: {unpooled['task_peak_mb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
