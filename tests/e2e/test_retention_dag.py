"""The retention teardown through Airflow (``dag.test()``): the store stays bounded over nightly runs of new
adapters, a collected stage is rebuilt on the next run, and the teardown never changes a run's state."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.helpers import write_config

pytestmark = pytest.mark.e2e

MODEL = "keeper"
VERSIONS = ("checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4")
KEEP_VERSIONS = 1


@pytest.fixture(scope="module")
def box(tmp_path_factory, demo_inputs) -> Path:
    """A training box with four adapters of the demo base (seeded, one day apart)."""
    from tests.fixtures.tiny_model import make_lora_adapter

    box = tmp_path_factory.mktemp("keeper-box")
    for day, version in enumerate(VERSIONS):
        checkpoint = make_lora_adapter(demo_inputs.base, box / version, seed=10 + day)
        os.utime(checkpoint, (1_800_000_000 + day * 86_400,) * 2)
    return box


def configure(tmp_path: Path, monkeypatch, demo_inputs, box: Path, **overrides: Any) -> Path:
    entry = {"base_model": str(demo_inputs.base), "source": {"kind": "local", "path": str(box)},
             "quantize": {"types": ["Q8_0"]}, "fidelity": {"enabled": False}, "notify": {"slack_conn_id": None},
             "lmstudio": {"models_dir": str(tmp_path / "lmstudio"), "keep_versions": KEEP_VERSIONS}, **overrides}
    monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(write_config(tmp_path / "models.yaml", MODEL, entry,
                                                              tmp_path / "artifacts")))
    return tmp_path / "artifacts" / MODEL


def run(conf: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """One ``dag.test()`` run: its state, every task's state, and the XCom of each task."""
    from airflow.dag_processing.dagbag import BundleDagBag

    dags = ROOT / "dags"
    bag = BundleDagBag(dag_folder=str(dags), bundle_path=dags, bundle_name="dags-folder")
    assert f"deploy_{MODEL}" in bag.dags, bag.import_errors
    dag_run = bag.dags[f"deploy_{MODEL}"].test(run_conf=conf)
    tis = dag_run.get_task_instances()
    states = {ti.task_id: str(ti.state) for ti in tis}
    xcom = {ti.task_id: ti.xcom_pull(task_ids=ti.task_id, map_indexes=ti.map_index) for ti in tis}
    return str(dag_run.state), states, xcom


def stage_entries(store: Path) -> dict[str, list[str]]:
    """The names in each stage directory (hidden leftovers included)."""
    return {stage.name: sorted(p.name for p in stage.iterdir()) for stage in sorted(store.iterdir())
            if stage.is_dir() and not stage.name.startswith(".")}


def stage_bytes(store: Path) -> int:
    """Bytes of every file in the stage directories (the ledger and the in-use marks are not artifacts)."""
    return sum(p.stat().st_size for stage in store.iterdir() if stage.is_dir() and not stage.name.startswith(".")
               for p in stage.rglob("*") if p.is_file())


def unique_bytes(*roots: Path) -> int:
    """Disk bytes of the files under ``roots``, a hard-linked file counted once."""
    seen = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                info = p.stat()
                seen[(info.st_dev, info.st_ino)] = info.st_size
    return sum(seen.values())


def test_nightly_runs_of_new_adapters_keep_the_store_bounded_and_collected_stages_are_rebuilt(
        tmp_path, monkeypatch, demo_inputs, box, airflow_db):
    store = configure(tmp_path, monkeypatch, demo_inputs, box)
    per_version = []
    for number, version in enumerate(VERSIONS, 1):
        state, states, xcom = run({"adapter_version": version})
        assert state == "success" and states["retention"] == "success", states
        # One version in the store: its quant entries and its adapter entry (files and manifests).
        entries_of_version = {Path(f["path"]).parent for f in xcom["ggufs"]["files"]} | {Path(xcom["download"]["path"])}
        per_version.append(sum(p.stat().st_size for e in entries_of_version for p in e.rglob("*") if p.is_file()))
        ledger = json.loads((store / "deployments.json").read_text())
        assert ledger["current"] == version
        entries = stage_entries(store)
        kept = min(number, KEEP_VERSIONS + 1)  # the current version and the previous one
        assert len(entries["adapter"]) == len(entries["gguf"]) == kept, entries  # one Q8_0 each, no f16
        assert "merged" not in entries  # the fused merge (the default) writes no merged model
        assert not [n for names in entries.values() for n in names if n.startswith(".")], entries
        report = xcom["retention"]
        assert report["released"] and report["freed_bytes"] > 0  # at least this run's f16 GGUF
        assert any(r["reason"].startswith("intermediate of kept version") for r in report["removed"])
        size = stage_bytes(store)
        bound = (KEEP_VERSIONS + 1) * max(per_version)
        print(f"after {version}: store {size} bytes, bound (keep_versions + 1) x (quants + adapter) = {bound}; "
              f"freed {report['freed_bytes']} bytes; store + LM Studio {unique_bytes(store, tmp_path / 'lmstudio')}")
        assert size <= bound

    # A kept version again: its f16 GGUF was collected, so convert builds it again; the quant is reused.
    state, states, xcom = run({"adapter_version": VERSIONS[-1]})
    assert state == "success", states
    assert xcom["download"]["reused"] and not xcom["convert"]["base"]["reused"] and xcom["quantize"]["reused"]
    assert xcom["install"]["noop"]

    # A collected version, forced: every stage is built again, and the run succeeds.
    state, states, xcom = run({"adapter_version": VERSIONS[0], "force": True})
    assert state == "success", states
    assert not xcom["download"]["reused"] and not xcom["convert"]["base"]["reused"]
    assert not xcom["quantize"]["reused"]
    assert stage_bytes(store) <= (KEEP_VERSIONS + 1) * max(per_version)  # checkpoint-1 is not kept: gone again


def test_a_failed_deploy_stays_failed_and_keeps_what_a_retry_needs(tmp_path, monkeypatch, demo_inputs, box,
                                                                  airflow_db):
    # A fidelity gate nothing can pass: convert fails for good after writing the f16 GGUF.
    store = configure(tmp_path, monkeypatch, demo_inputs, box,
                      fidelity={"enabled": True, "max_abs_logit_diff": 1e-12, "max_kl": 1e-15})
    state, states, xcom = run({"adapter_version": VERSIONS[0]})
    assert state == "failed" and states["convert"] == "failed", states
    assert states["retention"] == "success"  # the teardown ran, and did not turn the run green
    assert xcom["retention"]["released"] is None  # nothing delivered: what the run used stays for a retry
    entries = stage_entries(store)
    assert len(entries["adapter"]) == 1 and len(entries["gguf"]) == 1  # the adapter and the f16 GGUF

    # Once the failed run's marks are older than lease_hours, the next run's retention collects them. A dry run
    # says so and changes nothing.
    configure(tmp_path, monkeypatch, demo_inputs, box, retention={"lease_hours": 1e-6})
    before = sorted(str(p) for p in store.rglob("*"))
    state, states, xcom = run({"adapter_version": VERSIONS[0], "dry_run": True})
    assert state == "success" and states["retention"] == "success" and xcom["retention"]["dry_run"]
    assert {Path(r["path"]).parent.name for r in xcom["retention"]["removed"]} == {"adapter", "gguf"}
    assert sorted(str(p) for p in store.rglob("*")) == before

    # And a run that succeeds still ends in success.
    state, states, xcom = run({"adapter_version": VERSIONS[1]})
    assert state == "success" and states["retention"] == "success", states
    assert len(stage_entries(store)["adapter"]) == 1  # the failed run's adapter went with its lease
