"""The LM Studio models tree: home discovery, versioned installs, current/rollback, pruning, disk full, ``lms``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from include.errors import InstallError
from include.lmstudio.deploy import deploy, promote, rollback
from include.lmstudio.ledger import read_ledger
from include.lmstudio.models_tree import discover_home, install_version, lms_reload, models_dir
from include.store.hashing import sha256_file

T1, T2, T3 = "2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00", "2026-11-03T00:00:00+00:00"


def gguf_records(directory: Path, salt: bytes = b"", quants: tuple[str, ...] = ("Q8_0", "Q4_K_M")) -> list[dict]:
    """Small files with GGUF magic and version 3, distinct per salt."""
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for quant in quants:
        path = directory / f"model-{quant}.gguf"
        path.write_bytes(b"GGUF\x03\x00\x00\x00" + quant.encode() * 200 + salt)
        records.append({"quant": quant, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return records


def settings(tmp_path: Path, **extra: object) -> dict:
    return {"models_dir": str(tmp_path / "models"), "publisher": "acme", "repo": None, "keep_versions": 3,
            "gpu": "max", "context_length": None, "lms_path": None, "identifier": None, "quant": None, **extra}


def deploy_version(tmp_path: Path, version: str, when: str, salt: bytes, **kw: object) -> dict:
    return deploy(gguf_records(tmp_path / "store" / version, salt), {"version": version, "time": when}, model="m",
                  settings=settings(tmp_path, **kw), artifact_root=str(tmp_path / "art"), run_id=f"run-{version}")


def stable(tmp_path: Path, quant: str = "Q8_0") -> Path:
    return tmp_path / "models" / "acme" / "m-GGUF" / f"m-{quant}.gguf"


def test_home_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert discover_home() == tmp_path / ".lmstudio"  # nothing exists: the default
    (tmp_path / ".cache" / "lm-studio").mkdir(parents=True)
    assert discover_home() == tmp_path / ".cache" / "lm-studio"  # legacy
    (tmp_path / ".lmstudio").mkdir()
    assert discover_home() == tmp_path / ".lmstudio"
    elsewhere = tmp_path / "big-disk" / "lmstudio"
    elsewhere.mkdir(parents=True)
    (tmp_path / ".lmstudio-home-pointer").write_text(f"{elsewhere}\n")
    assert discover_home() == elsewhere
    assert models_dir({"models_dir": None, "home": None}) == elsewhere / "models"
    assert discover_home(str(tmp_path / "override")) == tmp_path / "override"
    assert models_dir({"models_dir": str(tmp_path / "m"), "home": None}) == tmp_path / "m"


def test_install_places_versioned_hard_links_at_lm_studio_depth(tmp_path: Path) -> None:
    record = deploy_version(tmp_path, "checkpoint-10", T1, b"1")
    paths = [Path(i["path"]) for i in record["installed"]]
    assert [p.relative_to(tmp_path / "models").parts for p in paths] == [
        ("acme", "m-GGUF", "m-checkpoint-10-Q8_0.gguf"), ("acme", "m-GGUF", "m-checkpoint-10-Q4_K_M.gguf")]
    assert all(i["linked"] for i in record["installed"]) and record["noop"] is False
    assert record["installed"][0]["identifier"] == "m"
    ledger = read_ledger(tmp_path / "art", "m")
    assert ledger["versions"]["checkpoint-10"]["status"] == "installed" and ledger["current"] is None
    assert ledger["versions"]["checkpoint-10"]["adapter_time"] == T1
    assert [e["action"] for e in ledger["events"]] == ["install"]


def test_same_version_twice_is_a_noop(tmp_path: Path) -> None:
    first = deploy_version(tmp_path, "checkpoint-10", T1, b"1")
    inode = os.stat(first["installed"][0]["path"]).st_ino
    again = deploy_version(tmp_path, "checkpoint-10", T1, b"1")
    assert again["noop"] is True and os.stat(again["installed"][0]["path"]).st_ino == inode
    assert [e["action"] for e in read_ledger(tmp_path / "art", "m")["events"]] == ["install", "noop"]


def test_promote_rollback_and_backfill_rules(tmp_path: Path) -> None:
    root = str(tmp_path / "art")
    deploy_version(tmp_path, "checkpoint-20", T2, b"2")
    p = promote(model="m", settings=settings(tmp_path), artifact_root=root, version="checkpoint-20", force=False,
                run_id="r2")
    assert p["promoted"] and p["previous"] is None and p["lms"] == []  # no lms on PATH/configured
    v2_bytes = stable(tmp_path).read_bytes()
    # a backfill of an older adapter installs but never becomes current ...
    deploy_version(tmp_path, "checkpoint-10", T1, b"1")
    older = promote(model="m", settings=settings(tmp_path), artifact_root=root, version="checkpoint-10",
                    force=False, run_id="r1")
    assert older["promoted"] is False and "not newer" in older["reason"]
    assert stable(tmp_path).read_bytes() == v2_bytes
    # ... unless promote is forced
    forced = promote(model="m", settings=settings(tmp_path), artifact_root=root, version="checkpoint-10",
                     force=True, run_id="r1b")
    assert forced["promoted"] and forced["previous"] == "checkpoint-20"
    assert sha256_file(stable(tmp_path)) == read_ledger(root, "m")["versions"]["checkpoint-10"]["files"][0]["sha256"]
    # a newer one replaces it, and a rollback puts checkpoint-10's bytes back
    deploy_version(tmp_path, "checkpoint-30", T3, b"3")
    v1_bytes = stable(tmp_path).read_bytes()
    assert promote(model="m", settings=settings(tmp_path), artifact_root=root, version="checkpoint-30",
                   force=False, run_id="r3")["promoted"]
    assert stable(tmp_path).read_bytes() != v1_bytes
    back = rollback(model="m", settings=settings(tmp_path), artifact_root=root, failed_version="checkpoint-30",
                    reason="live check failed: latency", run_id="r3")
    assert back["restored_version"] == "checkpoint-10" and stable(tmp_path).read_bytes() == v1_bytes
    ledger = read_ledger(root, "m")
    assert ledger["current"] == "checkpoint-10" and ledger["versions"]["checkpoint-30"]["status"] == "failed"
    assert ledger["previous"] == "checkpoint-20"
    assert ledger["events"][-1] | {"at": None} == {"at": None, "action": "rollback", "version": "checkpoint-10",
                                                   "from_version": "checkpoint-30",
                                                   "reason": "live check failed: latency", "run_id": "r3"}
    with pytest.raises(InstallError, match=r"'nope' is not installed; installed versions: \['checkpoint-10'"):
        promote(model="m", settings=settings(tmp_path), artifact_root=root, version="nope", force=True, run_id="x")


def test_prune_keeps_n_and_never_current_or_previous(tmp_path: Path) -> None:
    root = str(tmp_path / "art")
    for n in range(1, 6):
        deploy_version(tmp_path, f"checkpoint-{n}", f"2026-11-0{n}T00:00:00+00:00", bytes([n]), keep_versions=2)
        if n <= 2:
            promote(model="m", settings=settings(tmp_path), artifact_root=root, version=f"checkpoint-{n}",
                    force=False, run_id=f"r{n}")
    ledger = read_ledger(root, "m")
    # the newest 2 (5, 4) are kept, and current 2 and previous 1 are protected -> only 3 is pruned
    assert {v: e["status"] for v, e in ledger["versions"].items()} == {
        "checkpoint-1": "retired", "checkpoint-2": "current", "checkpoint-3": "pruned", "checkpoint-4": "installed",
        "checkpoint-5": "installed"}
    names = sorted(p.name for p in (tmp_path / "models" / "acme" / "m-GGUF").iterdir())
    assert not [n for n in names if "checkpoint-3" in n]
    assert [e["version"] for e in ledger["events"] if e["action"] == "prune"] == ["checkpoint-3"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False).returncode == 0


def test_disk_full_leaves_nothing_half_installed(tmp_path: Path) -> None:
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "64k"):
        pytest.fail("cannot mount a tmpfs (needs root); the disk-full test must run")
    try:
        root = str(tmp_path / "art")
        conf = settings(tmp_path, models_dir=str(small))
        ok = deploy(gguf_records(tmp_path / "s1", b"1", ("Q8_0",)), {"version": "v1", "time": T1}, model="m",
                    settings=conf, artifact_root=root, run_id="r1")
        promote(model="m", settings=conf, artifact_root=root, version="v1", force=False, run_id="r1")
        current = small / "acme" / "m-GGUF" / "m-Q8_0.gguf"
        before = current.read_bytes()
        big = gguf_records(tmp_path / "s2", b"x" * 200_000, ("Q8_0",))
        with pytest.raises(InstallError, match=r"B free, the GGUFs need .*Fix: free disk space"):
            deploy(big, {"version": "v2", "time": T2}, model="m", settings=conf, artifact_root=root, run_id="r2")
        names = sorted(p.name for p in current.parent.iterdir())
        assert names == ["m-Q8_0.gguf", Path(ok["installed"][0]["path"]).name]
        assert current.read_bytes() == before
        assert list(read_ledger(root, "m")["versions"]) == ["v1"]
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_write_failure_mid_install_removes_what_it_created(tmp_path: Path) -> None:
    """A copy that fails after the first quant (RLIMIT_FSIZE in a child; the store is on another filesystem)."""
    store = tmp_path / "store"
    if not _mount_tmpfs(store, "8m"):
        pytest.fail("cannot mount a tmpfs (needs root)")
    try:
        records = gguf_records(store, b"", ("Q8_0",)) + gguf_records(store / "b", b"y" * 300_000, ("Q4_K_M",))
        target = tmp_path / "models" / "p" / "r"
        code = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
                f"from include.lmstudio.models_tree import install_version; from include.errors import InstallError\n"
                f"try:\n    install_version({records!r}, target=__import__('pathlib').Path({str(target)!r}), "
                f"model='m', version='v1')\nexcept InstallError as e:\n    print(e); sys.exit(3)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).resolve().parents[3])
        assert result.returncode == 3, result.stderr
        assert "cannot install" in result.stdout and "m-v1-Q4_K_M.gguf" in result.stdout
        assert list(target.iterdir()) == [], "the first quant or a temp file was left behind"
    finally:
        subprocess.run(["umount", str(store)], check=False)


def test_lms_reload_unloads_then_loads_the_stable_key(tmp_path: Path, lmstudio: object) -> None:
    conf = {"models_dir": None, "home": None, "publisher": "acme", "repo": None, "identifier": "chat",
            "context_length": 2048, "gpu": "off", "lms_path": None}
    with pytest.raises(InstallError, match=r"`load acme/m-GGUF/m-Q8_0.gguf .*` failed with exit 1.*Cannot find"):
        lms_reload(conf, "m", "Q8_0")
    target = lmstudio.models_dir / "acme" / "m-GGUF"
    install = install_version(gguf_records(tmp_path / "s"), target=target, model="m", version="v1")
    assert install and Path(install[0]["path"]).parent == target
    (target / "m-Q8_0.gguf").write_bytes(Path(install[0]["path"]).read_bytes())
    runs = lms_reload(conf, "m", "Q8_0")
    assert [r[1:] for r in runs] == [["unload", "chat"], ["load", "acme/m-GGUF/m-Q8_0.gguf", "--identifier", "chat",
                                                          "--context-length", "2048", "--gpu", "off", "-y"]]
    assert lmstudio.calls()[-2:] == [r[1:] for r in runs]
    assert "chat" in lmstudio.model_ids()


def test_failed_lms_load_is_recorded_and_rolled_back(tmp_path: Path, lmstudio: object) -> None:
    """The files are current when `lms load` fails: the ledger says so and the rollback restores v1."""
    import json

    from include.lmstudio.deploy import promoted_in_run

    root = str(tmp_path / "art")
    conf = settings(tmp_path, models_dir=str(lmstudio.models_dir), lms_path=lmstudio.lms)
    for version, when, salt in (("v1", T1, b"1"), ("v2", T2, b"2")):
        deploy(gguf_records(tmp_path / "store" / version, salt), {"version": version, "time": when}, model="m",
               settings=conf, artifact_root=root, run_id=f"run-{version}")
    assert promote(model="m", settings=conf, artifact_root=root, version="v1", force=False, run_id="run-v1")["lms"]
    v1 = (lmstudio.models_dir / "acme" / "m-GGUF" / "m-Q8_0.gguf").read_bytes()
    state = json.loads(lmstudio.state_file.read_text())
    lmstudio.state_file.write_text(json.dumps({**state, "fail_load": {"m": True}}))
    with pytest.raises(InstallError, match=r"`load acme/m-GGUF/m-Q8_0.gguf .*` failed with exit 1.*not enough memory"):
        promote(model="m", settings=conf, artifact_root=root, version="v2", force=False, run_id="run-v2")
    assert read_ledger(root, "m")["current"] == "v2"
    assert promoted_in_run(root, "m", "run-v2") == "v2"
    lmstudio.state_file.write_text(json.dumps({**state, "loaded": {}}))
    back = rollback(model="m", settings=conf, artifact_root=root, failed_version="v2", reason="lms load failed",
                    run_id="run-v2")
    assert back["restored_version"] == "v1" and [a[1] for a in back["lms"]] == ["unload", "load"]
    assert (lmstudio.models_dir / "acme" / "m-GGUF" / "m-Q8_0.gguf").read_bytes() == v1
    assert "m" in lmstudio.model_ids()
