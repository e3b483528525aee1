"""The deploy DAG in a real running Airflow: REST trigger, LocalExecutor workers, callbacks in the dag-processor."""

from __future__ import annotations

import pytest

from tests.e2e.airflow_services import airflow_services, wait_for
from tests.e2e.helpers import LOOPBACK, listeners, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def running_airflow(tmp_path, demo_inputs, slack):
    entry = {"base_model": str(demo_inputs.base),
             "source": {"kind": "local", "path": str(demo_inputs.training_box)},
             "lmstudio": {"models_dir": str(tmp_path / "lmstudio")}}
    config = write_config(tmp_path / "models.yaml", "live", entry, tmp_path / "artifacts")
    services = airflow_services(tmp_path / "airflow", {
        "LORA_DEPLOY_CONFIG": str(config),
        "AIRFLOW_CONN_SLACK_WEBHOOK_DEFAULT": slack.airflow_conn(),
    })
    services.start()
    try:
        yield services
    finally:
        services.stop()


def test_rest_triggered_run_succeeds_and_the_dag_processor_tells_slack(running_airflow, slack):
    run_id = running_airflow.trigger("deploy_live", {"adapter_version": "checkpoint-10"})
    state = running_airflow.wait_for_run("deploy_live", run_id)
    assert state == "success", running_airflow.log_tail("scheduler")

    # The DAG-level success callback runs in the dag-processor, which pulls the stages' XComs itself.
    text = wait_for(lambda: slack.messages and slack.messages[-1]["text"], timeout_s=60,
                    what="the Slack success message (dag-processor callback)")
    assert "*live* deployed adapter `checkpoint-10`" in text
    assert "Q4_K_M" in text and "tokens/s" in text
    assert f"/dags/deploy_live/runs/{run_id}" in text
    # A healthy run logs nothing at ERROR: llama.cpp's notices and the converter's lines carry their real level.
    logs = sorted((running_airflow.home / "logs" / "dag_id=deploy_live" / f"run_id={run_id}").rglob("*.log"))
    assert len(logs) >= 10, logs
    errors = [f"{log.parent.parent.name}: {line[:300]}" for log in logs for line in log.read_text().splitlines()
              if '"level":"error"' in line.replace(" ", "") or '"level":"critical"' in line.replace(" ", "")]
    assert errors == []


def test_every_listener_is_on_loopback(running_airflow):
    found = listeners([p.pid for p in running_airflow.processes.values()])
    assert any(port == running_airflow.port for _, port, _ in found), found  # the api-server is seen
    assert [item for item in found if item[0] not in LOOPBACK] == []
