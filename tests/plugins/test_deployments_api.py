"""The Deployments page's data and JSON API: a ledger seeded through include/lmstudio/ledger.py, the real plugin app,
Airflow's real auth (SimpleAuthManager JWTs) and a migrated metadata DB."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from include.config.loader import load_config
from include.deployments import view as view
from include.deployments.page.app import create_app
from include.lmstudio import ledger as L

MODEL = "demo"
REPO, SPACE = "someone/demo-GGUF", "someone/demo-chat"
# version -> (adapter_time, {quant: (bytes, bits_per_weight, perplexity)}, health (latency_s, tokens_per_s, ok))
SEED = {
    "checkpoint-10": ("2026-11-01T10:00:00+00:00", {"Q8_0": (1_300_000, 8.50, 12.10), "Q4_K_M": (760_000, 4.89, 12.60)},
                      (0.80, 40.0, True)),
    "checkpoint-20": ("2026-11-08T10:00:00+00:00", {"Q8_0": (1_310_000, 8.50, 11.40), "Q4_K_M": (770_000, 4.90, 11.90)},
                      (0.60, 45.5, True)),
    "checkpoint-30": ("2026-11-15T10:00:00+00:00", {"Q8_0": (1_320_000, 8.50, 11.00), "Q4_K_M": (780_000, 4.91, 11.60)},
                      (2.50, 5.2, False)),
}


def write_config(path: Path, artifact_root: Path, *, extra_models: tuple[str, ...] = ()) -> Path:
    """A config with ``demo`` (HF repo + Space) and ``extra_models`` (no HF), artifacts under ``artifact_root``."""
    def entry(name: str, hf: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"base_model": str(path.parent / "base"),
                                "source": {"kind": "local", "path": str(path.parent / name)}}
        if hf:
            item["hf"] = {"repo_id": REPO, "space_id": SPACE}
        return item

    models = {MODEL: entry(MODEL, True), **{name: entry(name, False) for name in extra_models}}
    path.write_text(json.dumps({"settings": {"artifact_root": str(artifact_root)}, "models": models}))
    return path


def seed_ledger(root: Path, model: str = MODEL) -> None:
    """Three versions as the deploy DAG leaves them: 10 and 20 promoted, 30 promoted, failed health, rolled back."""
    for version, (when, quants, (latency, rate, ok)) in SEED.items():
        run_id = f"manual__{when}"
        files = [{"quant": q, "path": f"/lmstudio/{model}/{model}-{version}-{q}.gguf", "bytes": size,
                  "sha256": f"{i:064x}", "bits_per_weight": bpw, "perplexity": ppl}
                 for i, (q, (size, bpw, ppl)) in enumerate(quants.items())]
        with L.update_ledger(root, model) as ledger:
            L.record_install(ledger, version, adapter_time=when, files=files, run_id=run_id)
            L.set_current(ledger, version, action="promote", reason="adapter newer", run_id=run_id)
            L.append_health(ledger, version, {"ok": ok, "phase": "live", "latency_s": latency, "tokens_per_s": rate,
                                              "completion_tokens": 16, "answer_excerpt": "Once upon a time"})
            if not ok:
                L.add_event(ledger, "health_failed", version, reason="tokens_per_s below 10", run_id=run_id)
                L.set_current(ledger, ledger["previous"], action="rollback", reason="health failed", run_id=run_id,
                              failed=True)


@pytest.fixture
def seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config (``$LORA_DEPLOY_CONFIG``) whose artifact root holds demo's seeded ledger; returns the ledger."""
    root = tmp_path / "artifacts"
    seed_ledger(root)
    monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(write_config(tmp_path / "models.yaml", root)))
    return L.ledger_path(root, MODEL)


def test_list_models_summarises_current_version(seeded: Path) -> None:
    listing = view.list_models(load_config())
    [demo] = listing["models"]
    assert (demo["current"], demo["previous"], demo["versions"], demo["installed"]) == \
        ("checkpoint-20", "checkpoint-10", 3, 3)
    assert demo["current_health"]["latency_s"] == 0.60 and demo["current_health"]["tokens_per_s"] == 45.5
    assert demo["current_bytes"] == 1_310_000 + 770_000
    assert demo["last_event"]["action"] == "rollback" and demo["error"] is None
    assert demo["hf"] == {"repo": f"https://huggingface.co/{REPO}", "space": f"https://huggingface.co/spaces/{SPACE}"}
    assert (demo["deploy_dag_id"], demo["rollback_dag_id"]) == ("deploy_demo", "rollback_demo")


def test_model_detail_lists_versions_newest_first_with_figures(seeded: Path) -> None:
    detail = view.model_detail(load_config(), MODEL)
    versions = detail["version_list"]
    assert [v["version"] for v in versions] == ["checkpoint-30", "checkpoint-20", "checkpoint-10"]
    assert [v["status"] for v in versions] == ["failed", "current", "retired"]
    assert [(v["is_current"], v["is_previous"]) for v in versions] == [(False, False), (True, False), (False, True)]
    newest = versions[0]
    assert newest["health"]["ok"] is False and newest["health"]["latency_s"] == 2.50
    assert [(f["quant"], f["bytes"], f["bits_per_weight"], f["perplexity"]) for f in newest["files"]] == \
        [("Q8_0", 1_320_000, 8.50, 11.00), ("Q4_K_M", 780_000, 4.91, 11.60)]
    assert newest["total_bytes"] == 2_100_000
    assert newest["hf"]["version"] == f"https://huggingface.co/{REPO}/tree/v-checkpoint-30"
    assert newest["dag_run_url"] == "/dags/deploy_demo/runs/manual__2026-11-15T10%3A00%3A00%2B00%3A00"
    assert [e["action"] for e in detail["events"][:3]] == ["rollback", "health_failed", "promote"]


def test_history_series_are_aligned_oldest_first(seeded: Path) -> None:
    history = view.model_history(load_config(), MODEL)
    assert history["versions"] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert history["latency_s"] == [0.80, 0.60, 2.50]
    assert history["tokens_per_s"] == [40.0, 45.5, 5.2]
    assert history["health_ok"] == [True, True, False]
    assert history["quants"]["Q4_K_M"]["bytes"] == [760_000, 770_000, 780_000]
    assert history["quants"]["Q8_0"]["perplexity"] == [12.10, 11.40, 11.00]
    assert history["total_bytes"][0] == 2_060_000 and len(history["health"]) == 3


def test_unreadable_ledger_is_reported_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "artifacts"
    seed_ledger(root)
    broken = L.ledger_path(root, "broken")
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    loaded = load_config(write_config(tmp_path / "models.yaml", root, extra_models=("broken", "fresh")))
    by_name = {m["model"]: m for m in view.list_models(loaded)["models"]}
    assert by_name["demo"]["error"] is None and by_name["fresh"]["versions"] == 0 and by_name["fresh"]["error"] is None
    assert "model 'broken'" in by_name["broken"]["error"] and "unreadable" in by_name["broken"]["error"]
    assert view.model_history(loaded, "broken")["versions"] == []
    with pytest.raises(view.UnknownModelError, match=r"'nope' is not configured; configured models: \['broken'"):
        view.model_detail(loaded, "nope")


# -- the real plugin app behind Airflow's auth ---------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_auth(airflow_db: None) -> Iterator[Any]:
    """Airflow's configured auth manager (SimpleAuthManager), initialised in-process as the api-server does."""
    from airflow.api_fastapi.app import init_auth_manager

    yield init_auth_manager()


@pytest.fixture
def client(airflow_auth: Any, seeded: Path) -> TestClient:
    """A client of the plugin's own app (the one the api-server mounts at /lora-deploy)."""
    from plugins.lora_deploy_deployments import deployments_app

    return TestClient(deployments_app)


def token_for(auth_manager: Any, role: str = "viewer") -> str:
    """A JWT as POST /auth/token would issue it."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return auth_manager.generate_jwt(SimpleAuthManagerUser(username="someone", role=role))


ENDPOINTS = ["/api/models", f"/api/models/{MODEL}", f"/api/models/{MODEL}/history"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_endpoints_refuse_anonymous_and_forged_tokens(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer not.a.jwt"}).status_code == 403
    client.cookies.set("_token", "forged.cookie.value")
    assert client.get(path).status_code == 403


def test_endpoints_answer_a_bearer_token_and_the_ui_cookie(client: TestClient, airflow_auth: Any,
                                                          seeded: Path) -> None:
    before = seeded.read_bytes()
    token = token_for(airflow_auth)
    listing = client.get("/api/models", headers={"Authorization": f"Bearer {token}"})
    assert listing.status_code == 200 and listing.json()["models"][0]["current"] == "checkpoint-20"
    client.cookies.set("_token", token)
    detail = client.get(f"/api/models/{MODEL}")
    assert detail.status_code == 200 and len(detail.json()["version_list"]) == 3
    history = client.get(f"/api/models/{MODEL}/history").json()
    assert history["latency_s"] == [0.80, 0.60, 2.50]
    missing = client.get("/api/models/nope")
    assert missing.status_code == 404 and "configured models: ['demo']" in missing.json()["detail"]
    assert seeded.read_bytes() == before, "reading the page must never write the ledger"


def test_page_and_signin_are_static_and_openapi_documents_the_endpoints(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="models"' in page.text and "api/models" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", ""), "no CDN or external fetch"
    assert client.get("/signin").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/api/models", "/api/models/{model}", "/api/models/{model}/history"}


def test_models_the_user_may_not_read_are_hidden_and_refused(seeded: Path) -> None:
    app = create_app(lambda: "someone", can_read=lambda user, dag_id: dag_id != "deploy_demo")
    client = TestClient(app)
    assert client.get("/api/models").json()["models"] == []
    refused = client.get(f"/api/models/{MODEL}/history")
    assert refused.status_code == 403 and "deploy_demo" in refused.json()["detail"]


def test_plugin_registers_the_app_and_the_nav_entry() -> None:
    from plugins.lora_deploy_deployments import LoraDeployDeploymentsPlugin as Plugin

    [app] = Plugin.fastapi_apps
    assert app["url_prefix"] == "/lora-deploy"
    [entry] = Plugin.external_views
    assert (entry["name"], entry["destination"], entry["href"]) == ("Deployments", "nav", "/lora-deploy/")


def test_a_broken_config_file_is_a_500_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(tmp_path / "missing.yaml"))
    answer = TestClient(create_app(lambda: "someone")).get("/api/models")
    assert answer.status_code == 500
    assert "missing.yaml" in answer.json()["detail"] and "Fix:" in answer.json()["detail"]
