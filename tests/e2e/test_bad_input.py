"""Bad input fails the right task with a message naming the model, the problem and the fix; LM Studio is untouched."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.helpers import run_deploy, write_config

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
    assert records[stage]["state"] == "failed", {k: v["state"] for k, v in records.items()}
    assert records["install"]["state"] != "success"
    assert not list(deployment["lmstudio"].rglob("*.gguf")), "a failed run put files into LM Studio"
    output = capfd.readouterr()
    log = output.out + output.err
    for phrase in ("model 'broken'", "Fix:", *phrases):
        assert phrase in log, f"{phrase!r} not in the task log"
    failure = deployment["slack"].messages[-1]["text"]
    assert "broken" in failure and f"`{stage}`" in failure


def test_missing_adapter_config(broken_deployment, capfd):
    (broken_deployment["box"] / "checkpoint-20" / "adapter_config.json").unlink()
    broken_deployment["configure"]()
    state, records = run_deploy("deploy_broken")
    assert state == "failed", str({k: v["state"] for k, v in records.items()})
    assert_failed_cleanly(broken_deployment, records, "download", capfd, "has no adapter_config.json",
                          "save_pretrained")


def test_base_model_path_that_does_not_exist(broken_deployment, capfd, tmp_path):
    broken_deployment["configure"](base_model=str(tmp_path / "no-such-base"))
    state, records = run_deploy("deploy_broken")
    assert state == "failed", str({k: v["state"] for k, v in records.items()})
    assert_failed_cleanly(broken_deployment, records, "plan", capfd, "no-such-base", "does not exist")
    assert records["download"]["state"] != "success", "the plan let a doomed run download"


def test_quant_type_llama_cpp_does_not_know(broken_deployment):
    from airflow.sdk.definitions.param import ParamValidationError

    broken_deployment["configure"]()
    with pytest.raises(ParamValidationError, match="Q9_ZZ"):
        run_deploy("deploy_broken", {"quant_types": ["Q4_K_M", "Q9_ZZ"]})
    assert not broken_deployment["lmstudio"].exists()
    assert broken_deployment["slack"].messages == []
