"""StoreRetentionOperator: declarative, templated fields documented, "delivered" read from the run's records, and
the ledger's kept versions turned into what the store keeps (the whole run is tests/e2e/test_retention_dag.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.config.sections import RetentionSettings
from include.lmstudio import ledger as L
from include.store import leases
from include.store.artifacts import ArtifactStore
from operators.operators.retention import StoreRetentionOperator, delivered

PLAN_BOTH = {"targets": ["lmstudio", "huggingface"], "dry_run": False}


def test_constructor_does_no_io_and_templated_fields_are_documented() -> None:
    op = StoreRetentionOperator(task_id="retention", model="m", artifact_root="/nonexistent/x",
                                settings=RetentionSettings(), keep_versions=2)
    assert op.template_fields == ("artifact_root", "plan", "installed", "published", "dry_run")
    for name in op.template_fields:
        assert f":param {name}:" in (StoreRetentionOperator.__doc__ or "")


@pytest.mark.parametrize(("plan", "installed", "published", "expected"), [
    (PLAN_BOTH, {"installed": []}, {"revision": "abc"}, True),
    (PLAN_BOTH, {"installed": []}, None, False),  # publish failed: a retry of it may still come
    ({"targets": ["lmstudio"]}, {"installed": []}, None, True),
    ({"targets": ["huggingface"]}, None, {"revision": "abc"}, True),
    ({"targets": ["lmstudio"]}, None, None, False),  # the run failed before install
    ({"targets": ["lmstudio"], "dry_run": True}, None, None, True),  # nothing was built
    (None, None, None, True),  # the plan itself failed: nothing was built
])
def test_a_run_delivered_when_every_target_got_its_record(plan, installed, published, expected) -> None:
    assert delivered(plan, installed, published) is expected


def write(path: Path) -> None:
    path.write_text(path.name)


def _context(run_id: str) -> dict:
    return {"dag": SimpleNamespace(dag_id="deploy_m"), "run_id": run_id}


def test_execute_keeps_the_ledger_versions_and_releases_a_delivered_run(tmp_path: Path) -> None:
    run_holder = leases.holder_of("deploy_m", "manual__1")
    store = ArtifactStore(tmp_path, holder=run_holder)
    kept = store.build("m", "gguf", {"base": "f" * 64, "quant": "Q8_0"}, lambda tmp: write(tmp / "m-Q8_0.gguf"))
    dropped = store.build("m", "gguf", {"merged": "e" * 64}, lambda tmp: write(tmp / "m-F16.gguf"))
    with L.update_ledger(tmp_path, "m") as ledger:
        L.record_install(ledger, "v1", adapter_time="2026-01-01T00:00:00Z", run_id="manual__1",
                         files=[{"quant": "Q8_0", "path": "/lm/x.gguf", "bytes": 5,
                                 "sha256": kept.manifest["files"][0]["sha256"]}])
    op = StoreRetentionOperator(task_id="retention", model="m", artifact_root=str(tmp_path),
                                settings={"lease_hours": 1}, keep_versions=1, plan={"targets": ["lmstudio"]},
                                installed={"installed": []}, published=None, dry_run=False)
    record = op.execute(_context("manual__1"))
    assert record["released"] == run_holder and record["removed_count"] == 1
    assert record["removed"][0]["path"] == str(dropped.path) and not dropped.path.exists()
    assert kept.path.exists() and record["kept_count"] == 1


def test_a_bad_retention_section_fails_naming_the_field(tmp_path: Path) -> None:
    op = StoreRetentionOperator(task_id="retention", model="m", artifact_root=str(tmp_path),
                                settings={"lease_hours": -1}, keep_versions=1)
    with pytest.raises(AirflowFailException, match=r"model 'm'.*lease_hours.*Fix: correct models\.m\.retention"):
        op.execute(_context("manual__1"))
