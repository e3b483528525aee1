"""Three models deploying at once on one machine, their heavy stages held under a memory budget by a pool.

A running Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor with 4 slots; SQLite) and a
config whose ``settings.pools`` declares a *memory pool*: ``lora_deploy_heavy`` with BUDGET_MB slots, each
heavy task (merge, convert, every quantize, the smoke check's llama.cpp server) of each model taking TASK_MB.
``lora-deploy-trigger pools`` creates the pool through the REST API. The three deploy DAGs are triggered
together; while they run, the anonymous memory (RssAnon) of every task's process tree is sampled. All three must
succeed, never more than BUDGET_MB // TASK_MB heavy tasks may run at once, and together they never hold more than
the budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.airflow_services import airflow_services
from tests.e2e.concurrent_deploys import HEAVY, deploy_at_once

pytestmark = pytest.mark.e2e

MODELS = ("conc_a", "conc_b", "conc_c")
POOL = "lora_deploy_heavy"
BUDGET_MB = 2000  # the heavy stages' memory budget: the pool's slots
TASK_MB = 1000  # what one heavy task of a tiny model may hold (anonymous memory; convert, the largest: the converter
# subprocess with the HF tokenizer loaded alongside it in the task process)
PASSWORD = "Conc-urr3nt"


def write_concurrent_config(path: Path, base: Path, box: Path, tmp: Path) -> Path:
    """Three tiny models from one training box, each into its own LM Studio dir, heavy stages in the pool."""
    models = {name: {"base_model": str(base), "source": {"kind": "local", "path": str(box)},
                     "quantize": {"types": ["Q8_0", "Q4_K_M"]}, "fidelity": {"enabled": False},
                     "lmstudio": {"models_dir": str(tmp / f"lmstudio-{name}")},
                     "workers": {"heavy_pool": POOL, "heavy_pool_slots": TASK_MB},
                     "notify": {"slack_conn_id": None}} for name in MODELS}
    path.write_text(yaml.safe_dump({
        "settings": {"artifact_root": str(tmp / "artifacts"), "pools": {POOL: {"slots": BUDGET_MB}}},
        "defaults": {"retry": {"default": {"retries": 1, "delay_s": 0}}}, "models": models}))
    return path


def apply_pools(airflow, config: Path) -> str:
    """``lora-deploy-trigger pools`` as an operator runs it; its stdout."""
    env = {**os.environ, "LORA_DEPLOY_AIRFLOW_URL": airflow.url, "LORA_DEPLOY_AIRFLOW_PASSWORD": PASSWORD,
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "include.trigger", "pools", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, demo_inputs):
    tmp = tmp_path_factory.mktemp("concurrency")
    config = write_concurrent_config(tmp / "models.yaml", demo_inputs.base, demo_inputs.training_box, tmp)
    services = airflow_services(tmp / "airflow", {"LORA_DEPLOY_CONFIG": str(config)}, password=PASSWORD)
    services.start()
    try:
        yield services, config
    finally:
        services.stop()


def test_pools_command_creates_keeps_then_resizes_the_pool(airflow, tmp_path):
    services, config = airflow
    # Start without the pool, whichever test of this module ran first (the other one creates it too).
    assert services.api("DELETE", f"/pools/{POOL}").status_code in (204, 404)
    assert f"pool {POOL}: created with {BUDGET_MB} slots" in apply_pools(services, config)
    assert f"pool {POOL}: {BUDGET_MB} slots (unchanged)" in apply_pools(services, config)
    pool = services.api("GET", f"/pools/{POOL}").json()
    assert (pool["slots"], pool["include_deferred"]) == (BUDGET_MB, False)
    raw = yaml.safe_load(config.read_text())
    raw["settings"]["pools"][POOL]["slots"] = BUDGET_MB + 500
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(yaml.safe_dump(raw))
    assert f"pool {POOL}: {BUDGET_MB} -> {BUDGET_MB + 500} slots" in apply_pools(services, bigger)
    assert services.api("GET", f"/pools/{POOL}").json()["slots"] == BUDGET_MB + 500
    assert f"pool {POOL}: {BUDGET_MB + 500} -> {BUDGET_MB} slots" in apply_pools(services, config)  # as before


def test_three_models_at_once_stay_under_the_memory_budget(airflow):
    services, config = airflow
    apply_pools(services, config)
    report = deploy_at_once(services, [f"deploy_{m}" for m in MODELS], timeout_s=900)
    print(f"\nthree tiny deploys at once: {report['wall_s']} s; heavy tasks at once at most "
          f"{report['max_concurrent_heavy']}, heavy peak {report['heavy_peak_mb']} MB (budget {BUDGET_MB}), "
          f"all Airflow processes peak {report['airflow_peak_mb']} MB; per stage {report['task_peak_mb']}")
    assert report["states"] == {f"deploy_{m}": "success" for m in MODELS}, report["states"]
    assert report["runs_overlap_s"] > 0, "the three runs did not run at the same time"
    # Every heavy task of every model ran in the pool with its slots; the pool capped them.
    assert len(report["heavy"]) == 3 * (1 + 1 + 2 + 1)  # merge, convert, 2 quantize, smoke per model
    assert {(ti["pool"], ti["pool_slots"]) for ti in report["heavy"]} == {(POOL, TASK_MB)}
    assert report["max_concurrent_heavy"] <= BUDGET_MB // TASK_MB
    # The premise of a memory pool: no heavy task holds more than the slots it takes ...
    assert max(report["task_peak_mb"][stage] for stage in HEAVY) <= TASK_MB, report["task_peak_mb"]
    # ... so together they stay under the budget.
    assert report["heavy_peak_mb"] <= BUDGET_MB
    # Light tasks are not in the pool: they kept running while heavy ones waited.
    assert all(stage in report["task_peak_mb"] for stage in ("merge", "convert", "quantize", "install", "smoke"))
