"""Bad input fails the right task with a message naming the model, the problem and the fix; LM Studio is untouched."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.helpers import run_deploy, write_config
from tests.secrets_scan import assert_no_secrets, slack_secrets

pytestmark = pytest.mark.e2e


@pytest.fixture
def broken_deployment(tmp_path, monkeypatch, demo_inputs, slack, airflow_db):
    """Model ``broken`` on a private copy of the training box; returns a function that writes its config."""
    box = tmp_path / "box"
    shutil.copytree(demo_inputs.training_box, box)
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_WEBHOOK_DEFAULT", slack.airflow_conn())

    def configure(**overrides):
        entry = {"base_model": str(demo_inputs.base), "source": {"kind": "local", "path": str(box)},
                 "lmstudio": {"models_dir": str(tmp_path / "lmstudio")}, **overrides}
        monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(write_config(tmp_path / "models.yaml", "broken", entry,
                                                                  tmp_path / "artifacts")))

    return {"box": box, "lmstudio": tmp_path / "lmstudio", "slack": slack, "configure": configure}


def assert_failed_cleanly(deployment, records, stage, capfd, *phrases):
    """``stage`` failed (and no other stage but the rollback that follows it), with one failure message holding the
    model, every phrase and the fix; LM Studio got nothing; the one Slack message names the failed stage; the
    webhook URL is nowhere (a failure notification carries log links)."""
    states = {k: v["state"] for k, v in records.items()}
    assert states[stage] == "failed", states
    failed = [k for k, v in states.items() if k != "rollback" and "failed" in (v if isinstance(v, list) else [v])]
    assert failed == [stage], states
    assert records["install"]["state"] != "success"
    assert not list(deployment["lmstudio"].rglob("*.gguf")), "a failed run put files into LM Studio"
    output = capfd.readouterr()
    failures = [line for line in (output.out + output.err).splitlines()
                if line.startswith("airflow.sdk.exceptions.AirflowFailException: model 'broken': ")]
    mine = [line for line in failures if all(phrase in line for phrase in phrases)]
    assert len(mine) == 1, f"no single failure message holds {phrases}: {failures}"
    assert ". Fix: " in mine[0], mine[0]
    assert len(deployment["slack"].messages) == 1
    failure = deployment["slack"].messages[0]["text"]
    assert failure.startswith(":x: *broken* deploy") and f"• stage `{stage}` failed" in failure, failure
    assert_no_secrets(slack_secrets(deployment["slack"].url), dag_ids="deploy_broken", slack=deployment["slack"],
                      captured={"stdout": output.out, "stderr": output.err})


def test_missing_adapter_config(broken_deployment, capfd):
    (broken_deployment["box"] / "checkpoint-20" / "adapter_config.json").unlink()
    broken_deployment["configure"]()
    state, records = run_deploy("deploy_broken")
    assert state == "failed", str({k: v["state"] for k, v in records.items()})
    assert_failed_cleanly(broken_deployment, records, "download", capfd,
                          "checkpoint 'checkpoint-20' in local directory", "has no adapter_config.json",
                          "Fix: point the source at a peft checkpoint saved with save_pretrained()")
    assert records["plan"]["state"] == "success"


def test_base_model_path_that_does_not_exist(broken_deployment, capfd, tmp_path):
    broken_deployment["configure"](base_model=str(tmp_path / "no-such-base"))
    state, records = run_deploy("deploy_broken")
    assert state == "failed", str({k: v["state"] for k, v in records.items()})
    assert_failed_cleanly(broken_deployment, records, "plan", capfd,
                          f"base_model '{tmp_path / 'no-such-base'}' does not exist", "Fix: set base_model to")
    assert records["download"]["state"] != "success", "the plan let a doomed run download"


def test_quant_type_llama_cpp_does_not_know(broken_deployment):
    from airflow.sdk.definitions.param import ParamValidationError

    broken_deployment["configure"]()
    with pytest.raises(ParamValidationError, match=r"^Invalid input for param quant_types: 'Q9_ZZ' is not one of "):
        run_deploy("deploy_broken", {"quant_types": ["Q4_K_M", "Q9_ZZ"]})
    assert not broken_deployment["lmstudio"].exists()
    assert broken_deployment["slack"].messages == []
