"""Retention and collection through the engine: the ledger's versions and running builds are never touched; the rest
goes, killed builds' leftovers included; a collected stage is built again."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from include.store import leases, scratch
from include.store.artifacts import ArtifactStore
from include.store.lineage import scan
from include.store.retention import Keep, Policy, _remove_unless_leased, apply_retention

QUANTS = ("Q8_0", "Q4_K_M")


def _file(tmp: Path, name: str, text: str) -> dict[str, Any]:
    (tmp / name).write_text(text)
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "bytes": len(text)}


def deploy_version(store: ArtifactStore, version: str, *, imatrix: bool = True) -> dict[str, Any]:
    """The store entries one deploy makes, shaped like the real stages' manifests (the inputs name the sha256 of
    what each was made from). Returns the stage results and the quant files' sha256 (what the ledger records)."""
    adapter = store.build("m", "adapter", {"files": [version]}, lambda tmp: {
        "version": version, "x": _file(tmp, "adapter_model.safetensors", f"adapter {version}")})
    merged = store.build("m", "merged", {"adapter": adapter.manifest["sha256"], "base": "base"},
                         lambda tmp: {"x": _file(tmp, "model.safetensors", f"merged {version}" * 50)})
    f16 = store.build("m", "gguf", {"merged": merged.manifest["sha256"], "outtype": "f16"},
                      lambda tmp: {"gguf": _file(tmp, "m-F16.gguf", f"f16 {version}" * 40)})
    f16_sha = f16.manifest["gguf"]["sha256"]
    matrix = store.build("m", "imatrix", {"base": f16_sha}, lambda tmp: {
        "x": _file(tmp, "imatrix.gguf", f"imatrix {version}")}) if imatrix else None
    matrix_sha = matrix.manifest["files"][0]["sha256"] if matrix else None
    quants = {q: store.build("m", "gguf", {"base": f16_sha, "quant": q, "imatrix": matrix_sha},
                             lambda tmp, q=q: {"gguf": _file(tmp, f"m-{q}.gguf", f"{q} {version}" * 10)})
              for q in QUANTS}
    figures = [store.build("m", "fidelity", {"check": "logits", "merged": merged.manifest["sha256"],
                                             "gguf": f16_sha}, lambda tmp: {"figures": {"kl": 0.001}})]
    figures += [store.build("m", "fidelity", {"check": "perplexity", "gguf": r.manifest["gguf"]["sha256"]},
                            lambda tmp: {"figures": 7.5}) for r in quants.values()]
    return {"adapter": adapter, "merged": merged, "f16": f16, "imatrix": matrix, "quants": quants,
            "figures": figures, "shas": {r.manifest["gguf"]["sha256"] for r in quants.values()}}


def paths(root: Path) -> set[str]:
    """Every stage entry and hidden leftover under the model's stage directories."""
    return {f"{p.parent.name}/{p.name}" for stage in (root / "m").iterdir() if stage.is_dir()
            and not stage.name.startswith(".") for p in stage.iterdir()}


def entry(result: Any) -> str:
    return f"{result.path.parent.name}/{result.path.name}"


@pytest.fixture
def three(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Versions v1, v2, v3 built by one finished run each."""
    built = {}
    for v in ("v1", "v2", "v3"):
        built[v] = deploy_version(ArtifactStore(tmp_path, holder=f"run-{v}"), v)
        leases.release(tmp_path / "m", f"run-{v}")
    return built


def test_kept_versions_keep_quants_adapter_and_figures_and_lose_intermediates(tmp_path: Path, three) -> None:
    keep = Keep({v: three[v]["shas"] for v in ("v2", "v3")})
    report = apply_retention(tmp_path, "m", keep, Policy())
    expected = {entry(three[v][s]) for v in ("v2", "v3") for s in ("adapter",)}
    expected |= {entry(r) for v in ("v2", "v3") for r in [*three[v]["quants"].values(), *three[v]["figures"]]}
    assert paths(tmp_path) == expected
    removed = {Path(i.path).name: i.reason for i in report.removed}
    assert removed[three["v3"]["f16"].path.name] == "intermediate of kept version v3, which is delivered"
    assert removed[three["v1"]["adapter"].path.name] == "no kept version uses it"
    assert len(report.removed) == 9 + 3 * 2  # v1's whole lineage; the f16, merged and imatrix of v2 and v3
    assert report.freed_bytes == sum(i.bytes for i in report.removed) > 0
    kept = {Path(i.path).name: i.reason for i in report.kept}
    assert kept[three["v2"]["quants"]["Q8_0"].path.name] == "product of kept version v2"
    assert kept[three["v2"]["adapter"].path.name] == "source of kept version v2"
    assert kept[three["v3"]["figures"][0].path.name] == "figures of kept version v3"


def test_keep_intermediates_keeps_the_whole_lineage_of_kept_versions_only(tmp_path: Path, three) -> None:
    keep = Keep({"v3": three["v3"]["shas"]})
    apply_retention(tmp_path, "m", keep, Policy(keep_intermediates=True))
    v3 = three["v3"]
    assert paths(tmp_path) == {entry(r) for r in [v3["adapter"], v3["merged"], v3["f16"], v3["imatrix"],
                                                  *v3["quants"].values(), *v3["figures"]]}


def test_what_a_running_build_uses_is_never_collected_until_its_lease_runs_out(tmp_path: Path, three) -> None:
    running = deploy_version(ArtifactStore(tmp_path, holder="backfill-run"), "v4")  # not installed yet
    scratch_dir = scratch.claim(tmp_path / "m" / "gguf" / "fedcba9876543210", "tmp")  # and still writing
    keep = Keep({"v3": three["v3"]["shas"]})
    report = apply_retention(tmp_path, "m", keep, Policy(), release="run-v3")
    v4 = {entry(r) for r in [running["adapter"], running["merged"], running["f16"], running["imatrix"],
                             *running["quants"].values(), *running["figures"]]}
    assert v4 <= paths(tmp_path) and scratch_dir.exists()
    assert {i.reason.split(" (")[0] for i in report.kept if entry_of(i) in v4} == {"in use by backfill-run"}
    later = time.time() + 2 * 3600
    apply_retention(tmp_path, "m", keep, Policy(lease_s=3600), now=later)  # the backfill crashed: lease ran out
    assert not v4 & paths(tmp_path) and scratch_dir.exists()  # a live writer's scratch is never swept
    scratch.discard(scratch_dir)


def entry_of(item: Any) -> str:
    return f"{Path(item.path).parent.name}/{Path(item.path).name}"


def test_the_finishing_run_releases_its_own_marks_a_failed_run_keeps_them(tmp_path: Path) -> None:
    ok = deploy_version(ArtifactStore(tmp_path, holder="run-ok"), "v1")
    failed = deploy_version(ArtifactStore(tmp_path, holder="run-failed"), "v2")
    keep = Keep({"v1": ok["shas"]})
    report = apply_retention(tmp_path, "m", keep, Policy(), release="run-ok")
    assert report.released == "run-ok" and report.released_leases == 9
    assert entry(ok["f16"]) not in paths(tmp_path) and entry(ok["quants"]["Q8_0"]) in paths(tmp_path)
    assert entry(failed["f16"]) in paths(tmp_path)  # its failed task may be cleared and retried
    assert set(leases.fresh(tmp_path / "m", 3600)) == {(r.path.parent.name, r.path.name) for r in
                                                       [failed["adapter"], failed["merged"], failed["f16"],
                                                        failed["imatrix"], *failed["quants"].values(),
                                                        *failed["figures"]]}


def test_a_dry_run_changes_nothing_and_reports_what_would_go(tmp_path: Path, three) -> None:
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    report = apply_retention(tmp_path, "m", Keep({"v3": three["v3"]["shas"]}), Policy(), dry_run=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert report.dry_run and len(report.removed) == 9 * 2 + 3 and report.summary().startswith("m: would free")


def test_collection_sweeps_the_leftovers_of_killed_builds(tmp_path: Path, three) -> None:
    stage = tmp_path / "m" / "merged"
    dead = stage / ".0123456789abcdef.tmp-h-9-x"
    (dead / ".out.merging-h-9-y").mkdir(parents=True)
    (dead / ".out.merging-h-9-y" / ".model.safetensors.partial").write_bytes(b"p" * 10)
    (dead / ".lock").touch()
    orphan = stage / "00000000000000aa"
    orphan.mkdir()
    old_cache = tmp_path / "m" / "adapter" / scratch.resume_cache_name("abc")
    old_cache.mkdir()
    os.utime(old_cache, (1, 1))
    new_cache = tmp_path / "m" / "adapter" / scratch.resume_cache_name("def")
    new_cache.mkdir()
    report = apply_retention(tmp_path, "m", Keep({v: three[v]["shas"] for v in three}), Policy(keep_intermediates=True))
    left = paths(tmp_path)
    assert not {f"merged/{dead.name}", f"merged/{orphan.name}", f"adapter/{old_cache.name}"} & left
    assert f"adapter/{new_cache.name}" in left  # a retry may still resume it
    assert {Path(i.path).name for i in report.removed} == {dead.name, orphan.name, old_cache.name}


def test_a_lease_taken_while_an_entry_is_collected_puts_it_back(tmp_path: Path, three) -> None:
    quant = three["v1"]["quants"]["Q8_0"]
    target = next(e for e in scan(tmp_path / "m")[0] if e.path == quant.path)
    leases.take(tmp_path / "m", target.stage, target.key, "late-reader")
    assert not _remove_unless_leased(tmp_path / "m", target, Policy(), time.time())
    assert (quant.path / "manifest.json").is_file() and paths(tmp_path) >= {entry(quant)}


def test_after_collection_the_same_build_runs_again(tmp_path: Path, three) -> None:
    apply_retention(tmp_path, "m", Keep(), Policy())
    assert paths(tmp_path) == set()
    again = deploy_version(ArtifactStore(tmp_path, holder="rerun"), "v1")
    assert not again["f16"].reused and again["f16"].path == three["v1"]["f16"].path
    assert again["shas"] == three["v1"]["shas"]
