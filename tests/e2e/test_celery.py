"""Distributed mode for real, without Docker: the project's deploy DAG under CeleryExecutor.

PostgreSQL metadata DB and Redis broker (Debian packages, started on loopback by the fixture), the api-server,
scheduler and dag-processor, and two Celery workers as separate processes: queue ``default`` and queue ``gpu``.
The model's config sends the heavy stages to ``gpu`` (``workers.heavy_queue``) in pool ``heavy_pool``; the test
asserts from the REST API where every task instance ran.
"""

from __future__ import annotations

import textwrap
import time

import pytest

from tests.conftest import ROOT
from tests.e2e.airflow_services import wait_for
from tests.e2e.celery_services import WORKERS, start_distributed
from tests.e2e.helpers import write_config

pytestmark = pytest.mark.e2e

HEAVY = ("merge", "convert", "quantize")
PROBE_DAG = textwrap.dedent('''
    """Harness probe: one task per queue, the heavy one in heavy_pool."""
    import socket

    from airflow.sdk import DAG, task

    with DAG(dag_id="celery_probe", schedule=None):
        @task
        def light():
            return socket.gethostname()

        @task(queue="gpu", pool="heavy_pool")
        def heavy(previous):
            return previous

        heavy(light())
''')


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, demo_inputs):
    """A running CeleryExecutor Airflow whose dags folder holds the real deploy DAG of model ``fleet``."""
    base = tmp_path_factory.mktemp("celery")
    entry = {"base_model": str(demo_inputs.base),
             "source": {"kind": "local", "path": str(demo_inputs.training_box)},
             "lmstudio": {"models_dir": str(base / "lmstudio")},
             "notify": {"slack_conn_id": None},
             "workers": {"heavy_queue": "gpu", "heavy_pool": "heavy_pool"}}
    config = write_config(base / "models.yaml", "fleet", entry, base / "artifacts")
    dags = base / "dags"
    dags.mkdir()
    (dags / "celery_probe.py").write_text(PROBE_DAG)
    (dags / "deploy_models.py").symlink_to(ROOT / "dags" / "deploy_models.py")
    started = time.monotonic()
    running = start_distributed(base / "airflow", {"LORA_DEPLOY_CONFIG": str(config),
                                                   "AIRFLOW__CORE__DAGS_FOLDER": str(dags)})
    print(f"\ndistributed Airflow up in {time.monotonic() - started:.1f} s "
          f"(apt install {running.install_s:.1f} s)")
    try:
        running.airflow.api("POST", "/pools", json={"name": "heavy_pool", "slots": 1,
                                                    "description": "heavy stages (merge, convert, quantize)"},
                            ).raise_for_status()
        running.lmstudio = base / "lmstudio"  # type: ignore[attr-defined]
        yield running
    finally:
        running.stop()


def parsed(airflow, dag_id: str) -> None:
    """Wait until the dag-processor has stored ``dag_id``; on timeout, fail with the import errors."""
    def stored_or_broken() -> bool:
        return airflow.api("GET", f"/dags/{dag_id}").ok or bool(import_errors())

    def import_errors() -> list[str]:
        return [e.get("stack_trace", "")[-600:] for e in airflow.api("GET", "/importErrors").json()["import_errors"]]

    wait_for(stored_or_broken, timeout_s=90, what=f"{dag_id} to be parsed")
    if not airflow.api("GET", f"/dags/{dag_id}").ok:
        pytest.fail(f"{dag_id} does not parse; import errors: {import_errors()}")


def task_instances(airflow, dag_id: str, run_id: str) -> list[dict]:
    """The run's task instances that succeeded (REST)."""
    listing = airflow.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
    listing.raise_for_status()
    return [ti for ti in listing.json()["task_instances"] if ti["state"] == "success"]


def test_the_harness_routes_each_queue_to_its_own_worker(distributed):
    airflow = distributed.airflow
    parsed(airflow, "celery_probe")
    run_id = airflow.trigger("celery_probe")
    assert airflow.wait_for_run("celery_probe", run_id, timeout_s=120) == "success", airflow.log_tail("scheduler")
    where = {ti["task_id"]: (ti["hostname"], ti["queue"], ti["pool"])
             for ti in task_instances(airflow, "celery_probe", run_id)}
    assert where == {"light": (WORKERS["default"], "default", "default_pool"),
                     "heavy": (WORKERS["gpu"], "gpu", "heavy_pool")}


def test_heavy_stages_run_on_the_gpu_worker_and_the_rest_on_the_default_worker(distributed):
    airflow = distributed.airflow
    parsed(airflow, "deploy_fleet")
    started = time.monotonic()
    run_id = airflow.trigger("deploy_fleet", {"adapter_version": "checkpoint-10"})
    state = airflow.wait_for_run("deploy_fleet", run_id, timeout_s=240)
    print(f"deploy_fleet under CeleryExecutor: {state} in {time.monotonic() - started:.1f} s")
    assert state == "success", airflow.log_tail("scheduler") + airflow.log_tail(WORKERS["gpu"])

    ran = task_instances(airflow, "deploy_fleet", run_id)
    heavy = [ti for ti in ran if ti["task_id"] in HEAVY]
    light = [ti for ti in ran if ti["task_id"] not in HEAVY]

    print("where:", sorted((ti["task_id"], ti["map_index"], ti["hostname"]) for ti in ran))
    assert {ti["task_id"] for ti in heavy} == set(HEAVY)
    assert len(light) >= 5, [ti["task_id"] for ti in light]
    for ti in heavy:
        assert (ti["hostname"], ti["queue"], ti["pool"]) == (WORKERS["gpu"], "gpu", "heavy_pool"), ti
    for ti in light:
        assert (ti["hostname"], ti["queue"]) == (WORKERS["default"], "default"), ti
    # What the gpu worker produced reached LM Studio through the shared artifact root.
    assert list(distributed.lmstudio.rglob("*.gguf"))
