"""The training-job trigger client against a running Airflow (api-server, scheduler, dag-processor, triggerer).

The DAG here has the deploy DAGs' schedule shape (cron OR the model's adapter asset) and records what its run
saw (conf and the triggering asset events' extra), so the test can assert what reached the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.airflow_services import airflow_services, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-Tr1gger"

RECORDING_DAG = textwrap.dedent('''
    """deploy_demo stand-in: the deploy DAGs' schedule shape; its task records conf and asset event extras."""
    import json
    import os
    from pathlib import Path

    from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, get_current_context, task

    with DAG(dag_id="deploy_demo",
             schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"),
                                          assets=Asset(name="demo_adapter", uri="lora-deploy://demo/adapter")),
             catchup=False):
        @task
        def record():
            context = get_current_context()
            extras = [event.extra for events in context["triggering_asset_events"].values() for event in events]
            seen = {"conf": dict(context["dag_run"].conf or {}), "asset_extras": extras,
                    "run_type": str(context["dag_run"].run_type)}
            out = Path(os.environ["TRIGGER_RECORDS"]) / (context["run_id"].replace(":", "_") + ".json")
            out.write_text(json.dumps(seen))

        record()
''')


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """One running Airflow for the module, with the recording DAG unpaused."""
    base = tmp_path_factory.mktemp("trigger")
    dags, records = base / "dags", base / "records"
    dags.mkdir()
    records.mkdir()
    (dags / "deploy_demo.py").write_text(RECORDING_DAG)
    services = airflow_services(base / "airflow", {"AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                                                   "TRIGGER_RECORDS": str(records)}, password=PASSWORD)
    services.start()
    try:
        wait_for(lambda: services.api("GET", "/dags/deploy_demo").ok, timeout_s=120, what="deploy_demo parsed")
        services.api("PATCH", "/dags/deploy_demo", json={"is_paused": False}).raise_for_status()
        services.records = records  # type: ignore[attr-defined]
        yield services
    finally:
        services.stop()


def client(services, *args: str, password: str = PASSWORD, token: str | None = None,
           url: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m include.trigger`` as a training job would."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LORA_DEPLOY_AIRFLOW")}
    env.update({"LORA_DEPLOY_AIRFLOW_URL": url or services.url, "LORA_DEPLOY_AIRFLOW_USERNAME": "admin",
                "LORA_DEPLOY_AIRFLOW_PASSWORD": password, "PYTHONPATH": str(ROOT)})
    if token:
        env["LORA_DEPLOY_AIRFLOW_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "include.trigger", "--poll", "1", "--timeout", "180", *args],
                          env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


def _record(services, run_id: str) -> dict:
    path: Path = services.records / (run_id.replace(":", "_") + ".json")
    return json.loads(path.read_text())


def test_run_with_conf_waits_and_the_run_saw_the_conf(airflow):
    result = client(airflow, "run", "demo", "--adapter-version", "checkpoint-20", "--instance-id", "4242", "--wait")
    assert result.returncode == 0, result.stderr + airflow.log_tail("scheduler")
    lines = dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)
    assert lines["state"] == "success"
    seen = _record(airflow, lines["dag_run_id"])
    assert seen["conf"] == {"adapter_version": "checkpoint-20", "instance_id": "4242"}
    assert PASSWORD not in result.stdout + result.stderr


def test_asset_event_starts_an_asset_triggered_run_that_sees_the_extra(airflow):
    result = client(airflow, "asset", "demo", "--adapter-version", "checkpoint-30", "--wait")
    assert result.returncode == 0, result.stderr + airflow.log_tail("scheduler")
    fields = dict(token.split("=", 1) for token in result.stdout.split() if "=" in token)
    assert int(fields["asset_event_id"]) > 0
    seen = _record(airflow, fields["dag_run_id"])
    assert seen["run_type"].endswith("asset_triggered") or "ASSET" in seen["run_type"].upper()
    assert seen["asset_extras"][-1]["adapter_version"] == "checkpoint-30"
    assert seen["conf"] == {}


def test_a_token_from_the_environment_works_and_is_never_printed(airflow):
    result = client(airflow, "run", "demo", "--adapter-version", "checkpoint-10", password="wrong",
                    token=airflow.token)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dag_run_id=")
    assert airflow.token not in result.stdout + result.stderr


def test_bad_password_is_a_clear_credentials_error(airflow):
    result = client(airflow, "run", "demo", password="not-the-password")
    assert result.returncode == 2
    assert "refused user 'admin': bad username or password" in result.stderr
    assert "LORA_DEPLOY_AIRFLOW_PASSWORD" in result.stderr
    assert "not-the-password" not in result.stdout + result.stderr


@pytest.mark.parametrize("mode", ["run", "asset"])
def test_unknown_model_names_the_model_and_the_config(airflow, mode):
    result = client(airflow, mode, "nosuchmodel", "--adapter-version", "v1")
    assert result.returncode == 2
    assert "model 'nosuchmodel'" in result.stderr
    assert "config/models.yaml" in result.stderr and "dag-processor" in result.stderr
    if mode == "asset":
        assert "lora-deploy://nosuchmodel/adapter" in result.stderr


def test_wrong_url_says_the_api_server_is_unreachable():
    """Through the installed console script, as a training job's environment would call it."""
    from tests.stand_ins.sshd import free_port

    script = Path(sys.executable).parent / "lora-deploy-trigger"
    env = {**os.environ, "LORA_DEPLOY_AIRFLOW_URL": f"http://127.0.0.1:{free_port()}",
           "LORA_DEPLOY_AIRFLOW_PASSWORD": PASSWORD}
    env.pop("LORA_DEPLOY_AIRFLOW_TOKEN", None)
    result = subprocess.run([str(script), "run", "demo"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot reach the Airflow api-server" in result.stderr and "LORA_DEPLOY_AIRFLOW_URL" in result.stderr


def test_no_credentials_is_a_clear_error():
    env = {key: value for key, value in os.environ.items() if not key.startswith("LORA_DEPLOY_AIRFLOW")}
    result = subprocess.run([sys.executable, "-m", "include.trigger", "asset", "demo", "--adapter-version", "v1"],
                            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert "neither LORA_DEPLOY_AIRFLOW_PASSWORD nor LORA_DEPLOY_AIRFLOW_TOKEN" in result.stderr
