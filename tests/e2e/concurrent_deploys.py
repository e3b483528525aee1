"""Several models' deploy DAGs triggered at once in a running Airflow, with the memory their tasks held.

Shared by tests/e2e/test_concurrency.py (tiny models) and bench/pipeline/concurrency.py (0.5B models).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from tests.e2e.airflow_services import AirflowServices, wait_for
from tests.e2e.task_rss import TaskRssSampler, max_concurrent

HEAVY = ("merge", "convert", "quantize", "smoke")  # the tasks in the heavy pool (smoke: a llama.cpp server)
MB = 1_000_000


def deploy_at_once(airflow: AirflowServices, dag_ids: list[str], timeout_s: float = 1800,
                   anonymous: bool = True) -> dict[str, Any]:
    """Unpause, trigger every DAG in ``dag_ids`` at once, wait for all; the runs, their heavy tasks and memory.

    ``anonymous``: memory is RssAnon (what runs a machine out of memory; the default) or, False, RSS (which also
    counts the shared libraries and mmap-ed files each process maps, ~0.4 GB per process importing torch).

    Returns ``{"wall_s", "states", "heavy": [task instance records], "max_concurrent_heavy",
    "heavy_peak_mb", "task_peak_mb" (per stage), "airflow_peak_mb", "runs_overlap_s"}``.
    """
    for dag_id in dag_ids:
        wait_for(lambda dag_id=dag_id: airflow.api("GET", f"/dags/{dag_id}").ok, timeout_s=180,
                 what=f"{dag_id} to be parsed")
        airflow.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    runs: dict[str, str] = {}
    with TaskRssSampler([p.pid for p in airflow.processes.values()], anonymous=anonymous) as rss:
        started = time.monotonic()
        for dag_id in dag_ids:
            response = airflow.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {}})
            response.raise_for_status()
            runs[dag_id] = response.json()["dag_run_id"]

        def all_done() -> dict[str, str] | None:
            states = {d: airflow.api("GET", f"/dags/{d}/dagRuns/{r}").json()["state"] for d, r in runs.items()}
            return states if all(s in ("success", "failed") for s in states.values()) else None

        states = wait_for(all_done, timeout_s=timeout_s, what="the concurrent runs", interval_s=1)
        wall = time.monotonic() - started
    tis = [dict(ti, dag_id=d) for d, r in runs.items()
           for ti in airflow.api("GET", f"/dags/{d}/dagRuns/{r}/taskInstances").json()["task_instances"]]
    heavy = [ti for ti in tis if ti["task_id"] in HEAVY and ti.get("start_date") and ti.get("end_date")]
    per_task = rss.peak_per_task()
    stage_peaks: dict[str, int] = {}
    for ti in tis:
        stage_peaks[ti["task_id"]] = max(stage_peaks.get(ti["task_id"], 0), per_task.get(ti["id"], 0))
    run_spans = [_span(airflow.api("GET", f"/dags/{d}/dagRuns/{r}").json()) for d, r in runs.items()]
    return {
        "wall_s": round(wall, 1),
        "states": states,
        "heavy": heavy,
        "max_concurrent_heavy": max_concurrent([_span(ti) for ti in heavy]),
        "heavy_peak_mb": round(rss.peak_of({ti["id"] for ti in heavy}) / MB),
        "task_peak_mb": {k: round(v / MB) for k, v in sorted(stage_peaks.items()) if v},
        "airflow_peak_mb": round(rss.peak_total() / MB),
        "runs_overlap_s": round(min(e for _, e in run_spans) - max(s for s, _ in run_spans), 1),
    }


def _span(record: dict[str, Any]) -> tuple[float, float]:
    return (datetime.fromisoformat(record["start_date"]).timestamp(),
            datetime.fromisoformat(record["end_date"]).timestamp())
