"""The LM Studio deploy steps on top of the models tree and the ledger: install, promote, roll back, record health.

Each step runs under the ledger's exclusive lock, so two runs of one model never interleave, and the ledger is
written only when the step's file work succeeded (a promote whose ``lms load`` fails is still recorded, because
its files are current, and then fails - so the rollback finds it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from include.errors import InstallError
from include.lmstudio import ledger as L
from include.lmstudio.models_tree import (
    delete_files,
    identifier,
    install_version,
    lms_reload,
    make_current,
    models_dir,
    remove_stable,
    repo_dir,
    versions_to_prune,
)

log = logging.getLogger(__name__)


def adapter_time(adapter: dict[str, Any]) -> str | None:
    """The adapter's time (the checkpoint's mtime) from a download or merge record."""
    return adapter.get("time") or adapter.get("mtime") or adapter.get("adapter_time")


def adapter_version(adapter: dict[str, Any], *, model: str) -> str:
    """The adapter version of a download record (or a merge record's ``adapter_version``)."""
    version = adapter.get("version") or adapter.get("adapter_version")
    if not version:
        raise InstallError(f"the adapter record has no 'version' (keys: {sorted(adapter)})", model=model,
                           fix="pass the download task's XCom as adapter")
    return str(version)


def deploy(ggufs: list[dict[str, Any]], adapter: dict[str, Any], *, model: str, settings: dict[str, Any],
           artifact_root: str, run_id: str | None) -> dict[str, Any]:
    """Install the version's files (no-op when the same version with the same bytes is installed) and prune."""
    version = adapter_version(adapter, model=model)
    when = adapter_time(adapter)
    target = repo_dir(settings, model)
    if not ggufs:
        raise InstallError("no GGUF files to install", model=model, fix="check the quantize stage's output")
    result: dict[str, Any] = {"models_dir": str(models_dir(settings)), "directory": str(target), "version": version,
                              "adapter_time": when, "identifier": identifier(settings, model), "pruned": []}
    with L.update_ledger(artifact_root, model) as ledger:
        entry = ledger["versions"].get(version)
        if entry and _same_files(entry, ggufs):
            L.add_event(ledger, "noop", version, reason="same version and bytes already installed", run_id=run_id)
            log.info("%s %s is already installed with the same sha256: nothing to do", model, version)
            return {**result, "installed": _installed(entry["files"], settings, model), "noop": True}
        files = install_version(ggufs, target=target, model=model, version=version)
        extra = {g["quant"]: g for g in ggufs}
        L.record_install(ledger, version, adapter_time=when, run_id=run_id,
                         files=[{**extra[f["quant"]], **f} for f in files])
        result["pruned"] = _prune(ledger, int(settings.get("keep_versions", 3)), run_id=run_id, spare=version)
    installed = [{**f, "identifier": identifier(settings, model)} for f in files]
    return {**result, "installed": [{k: f[k] for k in ("quant", "path", "identifier", "bytes", "sha256", "linked")}
                                    for f in installed], "noop": False}


def prune(*, model: str, artifact_root: str, keep_versions: int, run_id: str | None,
          dry_run: bool = False) -> list[dict[str, Any]]:
    """Delete the files of the installed versions beyond ``keep_versions`` (never current or previous).

    Install prunes before the new version becomes current, so right after a promote one version more than
    ``keep_versions`` allows is still installed; the retention teardown calls this so that LM Studio and the
    artifact store keep the same versions. ``dry_run``: only the versions that would go, nothing deleted.
    """
    going = versions_to_prune(L.read_ledger(artifact_root, model), keep_versions)
    if dry_run or not going:  # nothing to change: the ledger is not locked, nor written (nor created)
        for version in going:
            log.info("would prune %s (keep_versions=%d)", version, keep_versions)
        return [{"version": version, "paths": []} for version in going]
    with L.update_ledger(artifact_root, model) as ledger:
        return _prune(ledger, keep_versions, run_id=run_id)


def _prune(ledger: dict[str, Any], keep: int, *, run_id: str | None, spare: str | None = None
           ) -> list[dict[str, Any]]:
    pruned = []
    for old in versions_to_prune(ledger, keep):
        if old == spare:
            continue
        removed = delete_files(ledger["versions"][old])
        ledger["versions"][old]["status"] = "pruned"
        L.add_event(ledger, "prune", old, reason=f"keep_versions={keep}", run_id=run_id)
        pruned.append({"version": old, "paths": removed})
        log.info("pruned %s (%d file(s))", old, len(removed))
    return pruned


def _same_files(entry: dict[str, Any], ggufs: list[dict[str, Any]]) -> bool:
    if entry.get("status") == "pruned":
        return False
    have = {f["quant"]: f["sha256"] for f in entry.get("files", []) if Path(f["path"]).is_file()}
    return have == {g["quant"]: g["sha256"] for g in ggufs}


def _installed(files: list[dict[str, Any]], settings: dict[str, Any], model: str) -> list[dict[str, Any]]:
    return [{"quant": f["quant"], "path": f["path"], "identifier": identifier(settings, model), "bytes": f["bytes"],
             "sha256": f["sha256"], "linked": False} for f in files]


def served_quant(settings: dict[str, Any], files: list[dict[str, Any]], *, model: str) -> str:
    """The quant that is loaded and health-checked: ``lmstudio.quant`` or the first installed one."""
    quants = [f["quant"] for f in files]
    wanted = settings.get("quant")
    if wanted is None:
        return quants[0]
    if wanted not in quants:
        raise InstallError(f"lmstudio.quant {wanted!r} is not among the installed quants {quants}", model=model,
                           fix="set lmstudio.quant to one of quantize.types")
    return str(wanted)


def promote(*, model: str, settings: dict[str, Any], artifact_root: str, version: str, force: bool,
            run_id: str | None) -> dict[str, Any]:
    """Make ``version`` current (stable files + ``lms load``) if its adapter is newer than the current one's or
    ``force``; else return ``promoted: False`` with the reason."""
    failure: InstallError | None = None
    with L.update_ledger(artifact_root, model) as ledger:
        entry = L.version_entry(ledger, version, model=model)
        current = ledger.get("current")
        record = {"promoted": False, "version": version, "previous": current,
                  "identifier": identifier(settings, model), "lms": [], "models_dir": str(models_dir(settings)),
                  "installed": _installed(entry["files"], settings, model)}
        if current == version:
            return {**record, "reason": f"{version} is already current"}
        if not force and not L.is_newer(ledger, version, current):
            theirs = ledger["versions"][current].get("adapter_time")
            reason = (f"adapter time {entry.get('adapter_time')} of {version} is not newer than {theirs} of the "
                      f"current {current}; run with promote=true to make it current anyway")
            log.info("not promoting: %s", reason)
            return {**record, "reason": reason}
        quant = served_quant(settings, entry["files"], model=model)
        make_current(repo_dir(settings, model), model, entry["files"])
        reason = "forced (promote=true)" if force else ("first version" if current is None else
                                                        f"adapter newer than {current}")
        try:
            record["lms"] = lms_reload(settings, model, quant)
        except InstallError as err:
            failure = err
            reason = f"{reason}; lms load failed"
        L.set_current(ledger, version, action="promote", reason=reason, run_id=run_id)
        record.update({"promoted": True, "reason": reason, "quant": quant})
    if failure is not None:
        raise failure
    log.info("%s is current (was %s): %s", version, current, reason)
    return record


def rollback(*, model: str, settings: dict[str, Any], artifact_root: str, failed_version: str | None,
             reason: str, run_id: str | None) -> dict[str, Any]:
    """Put the previous version back when ``failed_version`` is current; ``restored_version`` None otherwise
    (or when there was no previous version: then the stable files are removed and the model unloaded)."""
    with L.update_ledger(artifact_root, model) as ledger:
        record: dict[str, Any] = {"failed_version": failed_version, "restored_version": None, "reason": reason,
                                  "rolled_back": False, "lms": []}
        if failed_version is None or ledger.get("current") != failed_version:
            return record
        previous = ledger.get("previous")
        failed_files = ledger["versions"][failed_version]["files"]
        target = repo_dir(settings, model)
        if previous:
            files = ledger["versions"][previous]["files"]
            make_current(target, model, files)
            record["lms"] = lms_reload(settings, model, served_quant(settings, files, model=model))
        else:
            remove_stable(target, model, [f["quant"] for f in failed_files])
            record["lms"] = lms_reload(settings, model, None)
        L.set_current(ledger, previous, action="rollback", reason=reason, run_id=run_id, failed=True)
        record.update({"restored_version": previous, "rolled_back": True})
    log.info("rolled back %s -> %s: %s", failed_version, previous, reason)
    return record


def promoted_in_run(artifact_root: str, model: str, run_id: str | None) -> str | None:
    """The version this run promoted, if it is still current (for a rollback whose promote XCom is missing)."""
    ledger = L.read_ledger(artifact_root, model)
    for event in reversed(ledger["events"]):
        if event["action"] == "promote" and event["run_id"] == run_id:
            return event["version"] if ledger.get("current") == event["version"] else None
    return None


def failure_reason(artifact_root: str, model: str, version: str | None, run_id: str | None) -> str | None:
    """The reason of the latest ``health_failed`` event of ``version`` in this run, if any."""
    for event in reversed(L.read_ledger(artifact_root, model)["events"]):
        if event["action"] == "health_failed" and event["version"] == version and event["run_id"] == run_id:
            return str(event["reason"])
    return None


def record_health(artifact_root: str, model: str, version: str | None, report: dict[str, Any], *,
                  run_id: str | None, failure: str | None = None) -> None:
    """Append a health report to the version's history; with ``failure`` also a ``health_failed`` event."""
    if not version:
        return
    with L.update_ledger(artifact_root, model) as ledger:
        L.append_health(ledger, version, report)
        if failure:
            L.add_event(ledger, "health_failed", version, reason=failure, run_id=run_id)
