"""A run whose stages cannot fit the worker's memory fails in `plan`, naming the stage, the numbers and the fix,
before anything is downloaded, built or installed (the real DAG through dag.test, like test_bad_input.py)."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.helpers import run_deploy, write_config

pytestmark = pytest.mark.e2e


def test_a_memory_budget_too_small_for_the_stages_fails_the_plan(tmp_path, monkeypatch, demo_inputs, slack,
                                                                 airflow_db, capfd):
    box = tmp_path / "box"
    shutil.copytree(demo_inputs.training_box, box)
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_WEBHOOK_DEFAULT", slack.airflow_conn())
    artifacts, lmstudio = tmp_path / "artifacts", tmp_path / "lmstudio"
    entry = {"base_model": str(demo_inputs.base), "source": {"kind": "local", "path": str(box)},
             "lmstudio": {"models_dir": str(lmstudio)}, "workers": {"memory_budget_mb": 200}}
    monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(write_config(tmp_path / "models.yaml", "small", entry, artifacts)))

    state, records = run_deploy("deploy_small")

    assert state == "failed", {k: v["state"] for k, v in records.items()}
    assert records["plan"]["state"] == "failed" and records["download"]["state"] != "success"
    log = "".join(capfd.readouterr())
    for phrase in ("model 'small'", "cannot be deployed on this kind of worker", "convert needs ~",
                   "largest tensor", "budget workers.memory_budget_mb=200", "nothing was started", "Fix:",
                   "workers.heavy_queue"):
        assert phrase in log, f"{phrase!r} not in the task log"
    assert records["plan"]["xcom"] is None  # failed before returning a plan
    assert not list(artifacts.rglob("*.gguf")) and not list(artifacts.rglob("adapter_model.safetensors"))
    assert not lmstudio.exists() or not list(lmstudio.rglob("*.gguf"))
    assert "small" in slack.messages[-1]["text"] and "`plan`" in slack.messages[-1]["text"]
