"""The whole chain through Airflow: adapter over a real sshd, real merge and llama.cpp, Hub and Slack stand-ins."""

from __future__ import annotations

import json

import pytest

from include.gguf_reader import inspect_gguf
from include.hashing import sha256_file
from tests.e2e.helpers import run_deploy, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def deployment(tmp_path, monkeypatch, demo_inputs, sshd, hub, slack, airflow_db):
    """Config and connections for model ``e2e``: SSH training box, private HF repo + Space, Slack webhook."""
    entry = {
        "base_model": str(demo_inputs.base),
        "source": {"kind": "ssh", "ssh_conn_id": "training_box", "remote_dir": str(demo_inputs.training_box)},
        "quantize": {"types": ["Q8_0", "Q4_K_M"]},
        "lmstudio": {"models_dir": str(tmp_path / "lmstudio"), "publisher": "acme"},
        "hf": {"repo_id": f"{hub.user}/e2e-GGUF", "space_id": f"{hub.user}/e2e-chat", "private": True},
        "health": {"prompt": "Once upon a time", "max_tokens": 8},
    }
    config = write_config(tmp_path / "models.yaml", "e2e", entry, tmp_path / "artifacts")
    monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(config))
    monkeypatch.setenv("AIRFLOW_CONN_TRAINING_BOX", sshd.airflow_conn())
    monkeypatch.setenv("AIRFLOW_CONN_HUGGINGFACE_DEFAULT",
                       json.dumps({"conn_type": "generic", "host": hub.url, "password": hub.token}))
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_WEBHOOK_DEFAULT", slack.airflow_conn())
    return {"tmp": tmp_path, "hub": hub, "slack": slack, "sshd": sshd}


def test_deploy_end_to_end_then_rerun_reuses_everything(deployment, capfd):
    state, records = run_deploy("deploy_e2e")
    output = capfd.readouterr()
    assert state == "success", {k: v["state"] for k, v in records.items()}
    assert all(r["state"] == "success" for r in records.values())

    download, merge, quantize = (records[s]["xcom"] for s in ("download", "merge", "quantize"))
    assert download["version"] == "checkpoint-20" and not download["reused"]
    assert not merge["reused"] and merge["adapter_version"] == "checkpoint-20"
    assert [f["quant"] for f in quantize["files"]] == ["Q8_0", "Q4_K_M"]
    assert quantize["files"][1]["weights_by_type"].get("Q4_K", 0) > 0
    metadata = inspect_gguf(quantize["files"][1]["path"], with_sha256=False).metadata
    assert metadata["general.name"] == "e2e" and metadata["general.version"] == "checkpoint-20"

    # LM Studio: exactly models/<publisher>/<repo>/<file>.gguf, the very bytes the quantize stage made.
    installed = records["install"]["xcom"]["installed"]
    lm_dir = deployment["tmp"] / "lmstudio" / "acme" / "e2e-GGUF"
    assert sorted(p.name for p in lm_dir.iterdir()) == ["e2e-checkpoint-20-Q4_K_M.gguf", "e2e-checkpoint-20-Q8_0.gguf"]
    for item, produced in zip(installed, quantize["files"], strict=True):
        assert sha256_file(lm_dir / item["path"].rsplit("/", 1)[1]) == produced["sha256"]

    health = records["health"]["xcom"]
    assert health["ok"] and health["smoke"]["completion_tokens"] >= 1 and health["tokens_per_s"] > 0

    hub = deployment["hub"]
    repo = hub.repo(f"{hub.user}/e2e-GGUF", "model")
    assert {"e2e-Q8_0.gguf", "e2e-Q4_K_M.gguf", "README.md"} <= set(repo.files)
    assert "v-checkpoint-20" in repo.tags
    space = hub.repo(f"{hub.user}/e2e-chat", "space")
    assert space.variables["MODEL_REPO"]["value"] == f"{hub.user}/e2e-GGUF"
    assert "HF_TOKEN" in space.secrets  # private repo: the Space needs a token to download

    messages = [m.get("text", "") for m in deployment["slack"].messages]
    assert len(messages) == 1 and "e2e" in messages[0] and "checkpoint-20" in messages[0]
    assert "Q4_K_M" in messages[0]

    # Secrets never reach XCom or the logs.
    key_text = deployment["sshd"].client_key.read_text().splitlines()[1]
    for secret in (hub.token, key_text):
        assert secret not in json.dumps(records)
        assert secret not in output.out + output.err

    state, again = run_deploy("deploy_e2e")
    assert state == "success"
    assert again["download"]["xcom"]["reused"]
    assert again["merge"]["xcom"]["reused"], "the second run merged again"
    assert again["quantize"]["xcom"]["reused"], "the second run converted or quantized again"
    assert again["install"]["xcom"]["installed"] == installed
