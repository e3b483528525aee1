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


def _three_versions(tmp_path: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """v1, v2, v3 installed one after another as install + promote leave them: install pruned before each promote,
    so with keep_versions 1 all three are still in LM Studio. Their quant entries in the store and LM Studio files."""
    store = ArtifactStore(tmp_path / "artifacts", holder=leases.holder_of("deploy_m", "manual__3"))
    entries, files = {}, {}
    for day, version in enumerate(("v1", "v2", "v3"), start=1):
        built = store.build("m", "gguf", {"base": version * 21 + "0", "quant": "Q8_0"},
                            lambda tmp, v=version: write(tmp / f"m-{v}-Q8_0.gguf"))
        entries[version] = built.path
        files[version] = tmp_path / "lm" / f"m-{version}-Q8_0.gguf"
        files[version].parent.mkdir(exist_ok=True)
        write(files[version])
        with L.update_ledger(tmp_path / "artifacts", "m") as ledger:
            L.record_install(ledger, version, adapter_time=f"2026-01-0{day}T00:00:00Z", run_id=f"manual__{day}",
                             files=[{"quant": "Q8_0", "path": str(files[version]), "bytes": 5,
                                     "sha256": built.manifest["files"][0]["sha256"]}])
            L.set_current(ledger, version, action="promote", reason="newer", run_id=f"manual__{day}")
    return entries, files


@pytest.mark.parametrize("dry_run", [False, True])
def test_lm_studio_keeps_the_same_versions_as_the_store(tmp_path: Path, dry_run: bool) -> None:
    entries, files = _three_versions(tmp_path)
    op = StoreRetentionOperator(task_id="retention", model="m", artifact_root=str(tmp_path / "artifacts"),
                                settings={"lease_hours": 1}, keep_versions=1, plan={"targets": ["lmstudio"]},
                                installed={"installed": []}, published=None, dry_run=dry_run)
    record = op.execute(_context("manual__3"))
    assert record["lmstudio_pruned"] == ["v1"]
    ledger = L.read_ledger(tmp_path / "artifacts", "m")
    assert (ledger["current"], ledger["previous"]) == ("v3", "v2")
    assert files["v2"].exists() and files["v3"].exists() and entries["v2"].exists() and entries["v3"].exists()
    if dry_run:  # nothing changes
        assert files["v1"].exists() and entries["v1"].exists() and ledger["versions"]["v1"]["status"] != "pruned"
    else:  # v1 leaves LM Studio and the store together: its disk space comes back
        assert not files["v1"].exists() and not entries["v1"].exists()
        assert ledger["versions"]["v1"]["status"] == "pruned" and ledger["events"][-1]["action"] == "prune"
