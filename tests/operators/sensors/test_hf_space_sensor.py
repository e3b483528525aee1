"""HFSpaceRuntimeSensor in reschedule mode, really rescheduled by Airflow (``dag.test()``) against the Hub stand-in:
``waited_s`` counts from the first try's start, across every reschedule, not from the last poke."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.operators.operators.test_hf_operators import MODEL, make_space, published, settings
from tests.operators.operators.test_lmstudio_operators import register

POKE_INTERVAL_S = 1.0


def reschedules(dag_id: str) -> list[Any]:
    """The task reschedule rows Airflow wrote for ``space_ready`` of ``dag_id``."""
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskReschedule).join(TaskReschedule.task_instance).filter_by(
            dag_id=dag_id, task_id="space_ready").all()
        session.expunge_all()
        return rows


def test_waited_s_spans_every_reschedule(hub, tmp_path: Path, monkeypatch, airflow_db) -> None:
    from airflow.sdk import DAG

    from operators.sensors.hf_space import HFSpaceRuntimeSensor

    monkeypatch.setenv("AIRFLOW_CONN_HUGGINGFACE_DEFAULT", json.dumps(
        {"conn_type": "generic", "host": hub.url, "password": hub.token}))
    hub.space_build_stages = ["BUILDING", "BUILDING", "BUILDING", "RUNNING"]  # one stage per runtime read
    make_space(hub, tmp_path)
    hf = settings(hub, space_poke_interval_s=POKE_INTERVAL_S, space_timeout_s=120)
    with DAG("hf_space_reschedule", schedule=None, catchup=False) as dag:
        sensor = HFSpaceRuntimeSensor(task_id="space_ready", model=MODEL, published=published(hub), settings=hf,
                                      mode="reschedule", retries=0)
    assert sensor.reschedule and sensor.poke_interval == POKE_INTERVAL_S
    register(dag)

    started = time.monotonic()
    dag_run = dag.test()
    elapsed = time.monotonic() - started

    ti = dag_run.get_task_instance("space_ready")
    assert str(ti.state) == "success", ti.state
    record = ti.xcom_pull(task_ids="space_ready")
    polls = [path for method, path in hub.requests if method == "GET" and path.endswith("/runtime")]
    rows = reschedules("hf_space_reschedule")
    assert record["stage"] == "RUNNING" and len(polls) == 4 and len(rows) == 3  # three BUILDING pokes rescheduled
    # Each reschedule waits at least one poke interval before the next try, so the wait is at least three of them;
    # a clock that restarts at each try would report the last poke alone (a few milliseconds).
    assert len(rows) * POKE_INTERVAL_S <= record["waited_s"] <= elapsed
    first_try = min(row.start_date for row in rows)
    assert record["waited_s"] >= (rows[-1].reschedule_date - first_try).total_seconds()
