"""The download task of a real deploy DAG with a Vast.ai source: dag.test() with env connections.

The Vast.ai API is the loopback stand-in, the box the real sshd. Later stages are marked success without
running (``mark_success_pattern``): this file is about the download task, its log and its XCom.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import ROOT, SESSION_DIR
from tests.e2e.helpers import write_config
from tests.secrets_scan import assert_no_secrets, ssh_key_secrets
from tests.stand_ins.vastai import VastAIStandIn

pytestmark = pytest.mark.e2e
INSTANCE = "4242"
LATER_STAGES = r"^(merge|convert|quant_types|quantize|ggufs|install|smoke|promote|health|rollback|publish|space_ready)$"


@pytest.fixture
def vast_deployment(tmp_path, monkeypatch, demo_inputs, sshd, airflow_db):
    with VastAIStandIn() as vast:
        entry = {
            "base_model": str(demo_inputs.base),
            "source": {"kind": "vastai", "instance_id": int(INSTANCE), "ssh_conn_id": "vast_ssh",
                       "remote_dir": str(demo_inputs.training_box)},
            "retry": {"download": {"retries": 3, "delay_s": 0}},
        }
        config = write_config(tmp_path / "models.yaml", "vastdl", entry, tmp_path / "artifacts")
        monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(config))
        monkeypatch.setenv("AIRFLOW_CONN_VASTAI_DEFAULT", vast.airflow_conn())
        # The key travels inline in the connection (the case where leaking it would be easiest).
        ssh = json.loads(sshd.airflow_conn())
        ssh["host"], ssh["port"] = "placeholder.invalid", 1
        ssh["extra"].pop("key_file")
        ssh["extra"]["private_key"] = sshd.client_key.read_text()
        monkeypatch.setenv("AIRFLOW_CONN_VAST_SSH", json.dumps(ssh))
        yield vast


def run_download(dag_id: str, task_id: str = "download"):
    from airflow.dag_processing.dagbag import BundleDagBag

    dags = ROOT / "dags"
    bag = BundleDagBag(dag_folder=str(dags), bundle_path=dags, bundle_name="dags-folder")
    assert dag_id in bag.dags, bag.import_errors
    dag_run = bag.dags[dag_id].test(mark_success_pattern=LATER_STAGES)
    ti = dag_run.get_task_instance(task_id)
    return ti, ti.xcom_pull(task_ids=task_id)


def task_logs() -> str:
    logs = SESSION_DIR / "airflow" / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()) if logs.exists() else ""


def test_vastai_download_logs_progress_and_never_a_secret(vast_deployment, sshd, capfd, caplog):
    vast = vast_deployment
    caplog.set_level(logging.INFO)  # the task log level of a worker (dag.test leaves the root logger at WARNING)
    vast.add_instance(INSTANCE, ssh_host="127.0.0.1", ssh_port=sshd.port)
    ti, record = run_download("deploy_vastdl")
    out = capfd.readouterr()
    text = out.out + out.err + task_logs() + caplog.text
    assert str(ti.state) == "success", text[-3000:]
    assert record["version"] == "checkpoint-20" and record["transfer"]["method"] in ("rsync", "sftp")
    assert "% of" in text and "MB/s" in text, "no progress line in the task log"
    assert_no_secrets({"Vast.ai API key": vast.api_key, **ssh_key_secrets(sshd.client_key.read_text())},
                      dag_ids="deploy_vastdl", run_ids=[ti.run_id],
                      captured={"stdout": out.out, "stderr": out.err, "caplog": caplog.text})
    assert vast.requests and all(r["authorization"] == f"Bearer {vast.api_key}" for r in vast.requests)


def test_stopped_instance_fails_once_with_its_status(vast_deployment, sshd, capfd):
    vast = vast_deployment
    vast.add_instance(INSTANCE, status="stopped")
    ti, _ = run_download("deploy_vastdl", "plan")  # the plan is the first to ask Vast.ai for the box
    out = capfd.readouterr()
    assert str(ti.state) == "failed"
    assert ti.try_number == 1, "a stopped instance must not burn the task's retries"
    assert len(vast.requests) == 1
    failures = [line for line in (out.out + out.err + task_logs()).splitlines()
                if line.startswith("airflow.sdk.exceptions.AirflowFailException: model 'vastdl': ")]
    assert any(f"instance {INSTANCE} is not running (actual_status 'stopped')" in line for line in failures), failures
    # the error path quotes the API's answer: neither secret may ride along
    assert_no_secrets({"Vast.ai API key": vast.api_key, **ssh_key_secrets(sshd.client_key.read_text())},
                      dag_ids="deploy_vastdl", run_ids=[ti.run_id], captured={"stdout": out.out, "stderr": out.err},
                      min_xcoms=0)
