"""The deployments ledger: schema, atomic locked updates, current/previous bookkeeping."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from include.errors import InstallError
from include.lmstudio import ledger as L


def _install(root: Path, version: str, when: str, run_id: str = "r") -> None:
    with L.update_ledger(root, "m") as ledger:
        L.record_install(ledger, version, adapter_time=when, run_id=run_id,
                         files=[{"quant": "Q8_0", "path": f"/x/{version}.gguf", "bytes": 1, "sha256": "ab",
                                 "bits_per_weight": 8.5}])


def test_schema_of_a_fresh_ledger_and_an_install(tmp_path: Path) -> None:
    assert L.read_ledger(tmp_path, "m") == L.empty_ledger("m")
    _install(tmp_path, "checkpoint-10", "2026-11-01T00:00:00Z")
    data = json.loads((tmp_path / "m" / "deployments.json").read_text())
    assert data["schema"] == L.SCHEMA and data["model"] == "m" and data["current"] is None
    entry = data["versions"]["checkpoint-10"]
    assert set(entry) == {"version", "adapter_time", "installed_at", "status", "dag_run_id", "files", "health", "hf"}
    assert entry["files"][0] == {"quant": "Q8_0", "path": "/x/checkpoint-10.gguf", "bytes": 1, "sha256": "ab",
                                 "bits_per_weight": 8.5, "perplexity": None}
    assert set(data["events"][0]) == {"at", "action", "version", "from_version", "reason", "run_id"}
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".deployments.json.tmp")]


def test_current_previous_and_newer(tmp_path: Path) -> None:
    _install(tmp_path, "a", "2026-11-01T00:00:00Z")
    _install(tmp_path, "b", "2026-11-02T00:00:00+00:00")
    with L.update_ledger(tmp_path, "m") as ledger:
        assert L.is_newer(ledger, "a", None)
        L.set_current(ledger, "a", action="promote", reason="first", run_id="r1")
        assert L.is_newer(ledger, "b", "a") and not L.is_newer(ledger, "a", "b")
        L.set_current(ledger, "b", action="promote", reason="newer", run_id="r2")
        assert (ledger["current"], ledger["previous"]) == ("b", "a")
        L.set_current(ledger, "a", action="rollback", reason="health", run_id="r2", failed=True)
        assert (ledger["current"], ledger["previous"]) == ("a", None)  # b failed: never a rollback target
        assert ledger["versions"]["b"]["status"] == "failed"
        L.append_health(ledger, "a", {"ok": True})
    assert L.read_ledger(tmp_path, "m")["versions"]["a"]["health"] == [{"ok": True}]
    assert L.installed_versions(L.read_ledger(tmp_path, "m")) == ["a", "b"]


def test_failed_block_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    _install(tmp_path, "a", "2026-11-01T00:00:00Z")
    before = (tmp_path / "m" / "deployments.json").read_bytes()
    with pytest.raises(RuntimeError), L.update_ledger(tmp_path, "m") as ledger:
        L.set_current(ledger, "a", action="promote", reason="x", run_id="r")
        raise RuntimeError("file work failed")
    assert (tmp_path / "m" / "deployments.json").read_bytes() == before


def test_unreadable_or_foreign_ledger_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "deployments.json").write_text("{not json")
    with pytest.raises(InstallError, match=r"model 'm': the deployments ledger .* is unreadable.*Fix: restore"):
        L.read_ledger(tmp_path, "m")
    (tmp_path / "m" / "deployments.json").write_text('{"schema": 99}')
    with pytest.raises(InstallError, match=r"has schema 99, expected 1"):
        L.read_ledger(tmp_path, "m")


def _add_events(root: str, n: int) -> None:
    for i in range(n):
        with L.update_ledger(root, "m") as ledger:
            L.add_event(ledger, "noop", f"v{i}", reason="concurrency", run_id=str(i))


def test_concurrent_writers_lose_no_event(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_events, args=(str(tmp_path), 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(L.read_ledger(tmp_path, "m")["events"]) == 100
