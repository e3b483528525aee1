"""The whole chain through Airflow: adapter over a real sshd, real merge and llama.cpp, Hub and Slack stand-ins."""

from __future__ import annotations

import json

import pytest

from include.gguf.reader import inspect_gguf
from include.store.hashing import sha256_file
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
        "hf": {"repo_id": f"{hub.user}/e2e-GGUF", "space_id": f"{hub.user}/e2e-chat", "private": True,
               "space_poke_interval_s": 0.5},
        "health": {"prompt": "Once upon a time", "max_tokens": 8},
        # A merged model in the store, kept with its version, so the re-run below reuses every stage.
        "merge": {"backend": "streaming"}, "retention": {"keep_intermediates": True},
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
    states = {k: v["state"] for k, v in records.items()}
    assert states.pop("rollback") == "skipped" and states.pop("quantize") == ["success"]
    assert set(states.values()) == {"success"}, states

    download, merge, convert, ggufs = (records[s]["xcom"] for s in ("download", "merge", "convert", "ggufs"))
    assert download["version"] == "checkpoint-20" and not download["reused"]
    assert not merge["reused"] and merge["adapter_version"] == "checkpoint-20"
    assert records["plan"]["xcom"]["version"] == "checkpoint-20"
    # triggered without adapter_version: the plan chose the newest, and every record says so
    assert records["plan"]["xcom"]["selected_by"] == download["selected_by"] == "newest"
    assert [f["quant"] for f in records["quantize"]["xcom"]] == ["Q8_0", "Q4_K_M"]  # one mapped task each
    files = ggufs["files"]
    assert [f["quant"] for f in files] == ["Q8_0", "Q4_K_M"]
    assert files[1]["weights_by_type"].get("Q4_K", 0) > 0
    assert convert["tokenizer"]["comparison"]["equal"] and convert["fidelity"]["passed"]
    assert all(f["ppl_ratio"] is not None for f in files)
    metadata = inspect_gguf(files[1]["path"], with_sha256=False).metadata
    assert metadata["general.name"] == "e2e" and metadata["general.version"] == "checkpoint-20"

    # LM Studio: exactly models/<publisher>/<repo>/<file>.gguf: the versioned files (the very bytes the
    # quantize stage made) and the stable "current" file per quant.
    installed = records["install"]["xcom"]["installed"]
    lm_dir = deployment["tmp"] / "lmstudio" / "acme" / "e2e-GGUF"
    assert sorted(p.name for p in lm_dir.iterdir()) == [
        "e2e-Q4_K_M.gguf", "e2e-Q8_0.gguf", "e2e-checkpoint-20-Q4_K_M.gguf", "e2e-checkpoint-20-Q8_0.gguf"]
    for item, produced in zip(installed, files, strict=True):
        assert sha256_file(item["path"]) == produced["sha256"]
    assert records["promote"]["xcom"]["promoted"]
    assert sha256_file(lm_dir / "e2e-Q8_0.gguf") == files[0]["sha256"]

    smoke = records["smoke"]["xcom"]
    assert smoke["ok"] and smoke["tokens_per_s"] > 0 and smoke["disk_free_bytes"]["models_dir"] > 0
    assert records["health"]["xcom"]["skipped"]  # no live endpoint configured
    assert records["rollback"]["state"] == "skipped"
    assert records["space_ready"]["state"] == "success"

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

    # The fidelity figures (logits, f16 and per-quant perplexity) are kept in the store, keyed by file hashes.
    fidelity = sorted((deployment["tmp"] / "artifacts" / "e2e" / "fidelity").glob("*/manifest.json"))
    assert len(fidelity) == 4
    stamps = [p.stat().st_mtime_ns for p in fidelity]

    state, again = run_deploy("deploy_e2e")
    assert state == "success"
    assert [p.stat().st_mtime_ns for p in fidelity] == stamps, "the second run evaluated the models again"
    assert again["convert"]["xcom"]["fidelity"] == convert["fidelity"]
    assert again["download"]["xcom"]["reused"]
    assert again["merge"]["xcom"]["reused"], "the second run merged again"
    assert again["convert"]["xcom"]["base"]["reused"], "the second run converted again"
    assert all(q["reused"] for q in again["quantize"]["xcom"]), "the second run quantized again"
    assert again["install"]["xcom"]["noop"]
    assert [i["path"] for i in again["install"]["xcom"]["installed"]] == [i["path"] for i in installed]


def test_dry_run_plans_and_writes_nothing(deployment):
    tmp = deployment["tmp"]
    before = sorted(str(p) for p in tmp.rglob("*"))
    state, records = run_deploy("deploy_e2e", {"dry_run": True, "quant_types": ["Q4_K_M", "Q5_K_M"]})
    assert state == "success"
    plan = records["plan"]["xcom"]
    assert plan["dry_run"] and plan["version"] == "checkpoint-20" and plan["quant_types"] == ["Q4_K_M", "Q5_K_M"]
    assert [o["name"] for o in plan["outputs"]] == ["merged", "F16", "Q4_K_M", "Q5_K_M"]
    assert all(d["ok"] for d in plan["disk"]) and plan["parameters"] > 0
    states = {k: v["state"] for k, v in records.items() if k != "plan"}
    assert all(state in ("skipped", ["skipped"]) for state in states.values()), states
    assert sorted(str(p) for p in tmp.rglob("*")) == before, "a dry run wrote files"
    assert deployment["hub"].repos == {}
    assert deployment["slack"].messages == []


def test_fused_merge_deploys_the_same_gguf_without_writing_a_merged_model(tmp_path, monkeypatch, demo_inputs,
                                                                          airflow_db):
    """merge.backend fused vs streaming, same adapter: the same f16 and Q8_0 bytes, the fidelity gate passes."""
    converted = {}
    for backend in ("streaming", "fused"):
        root = tmp_path / backend
        root.mkdir()
        box = str(demo_inputs.training_box)
        entry = {"base_model": str(demo_inputs.base), "source": {"kind": "local", "path": box},
                 "merge": {"backend": backend}, "quantize": {"types": ["Q8_0"]},
                 "retention": {"keep_intermediates": True},
                 "lmstudio": {"models_dir": str(root / "lmstudio")}, "notify": {"slack_conn_id": None}}
        monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(write_config(root / "models.yaml", "fusion", entry,
                                                                  root / "artifacts")))
        state, records = run_deploy("deploy_fusion", {"targets": ["lmstudio"]})
        assert state == "success", {k: v["state"] for k, v in records.items()}
        merge, convert = records["merge"]["xcom"], records["convert"]["xcom"]
        assert convert["fidelity"]["passed"] and convert["tokenizer"]["comparison"]["equal"]
        converted[backend] = (convert["base"]["sha256"], records["ggufs"]["xcom"]["files"][0]["sha256"])
        stored_merges = list((root / "artifacts" / "fusion").glob("*/merged*")) + list(
            (root / "artifacts" / "fusion").rglob("model*.safetensors"))
        if backend == "fused":
            assert merge["backend"] == "fused" and merge["bytes"] == 0 and merge["path"] == str(demo_inputs.base)
            assert stored_merges == [], stored_merges  # nothing merged was written
        else:
            assert stored_merges
    assert converted["fused"] == converted["streaming"]
