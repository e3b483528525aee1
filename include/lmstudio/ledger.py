"""The deployments ledger: ``<artifact_root>/<model>/deployments.json``, one model's LM Studio history.

Schema (``schema`` = :data:`SCHEMA`; documented for users and UI builders in docs/lmstudio.md)::

    {"schema": 1, "model": "demo", "current": "checkpoint-20" | null, "previous": "checkpoint-10" | null,
     "versions": {"<version>": {"version", "adapter_time", "installed_at", "status", "dag_run_id",
                                "files": [{"quant", "path", "bytes", "sha256", "bits_per_weight", "perplexity"}],
                                "health": [<health report>, ...], "hf": {...}}},
     "events": [{"at", "action", "version", "from_version", "reason", "run_id"}, ...]}

``status`` is one of :data:`STATUSES`; ``action`` one of :data:`ACTIONS`. ``events`` is append-only.
Every change goes through :func:`update_ledger`: an exclusive ``fcntl`` lock on a sibling ``.lock`` file,
read, change, write to a temp file, fsync, rename - readers never see a half-written ledger.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.errors import InstallError

SCHEMA = 1
FILE_NAME = "deployments.json"
STATUSES = ("installed", "current", "retired", "failed", "pruned")
ACTIONS = ("install", "promote", "rollback", "prune", "health_failed", "noop")


def now_iso() -> str:
    """The current UTC time as ISO-8601 with seconds, e.g. ``2026-11-23T21:00:00+00:00``."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def ledger_path(root: str | Path, model: str) -> Path:
    """Where ``model``'s ledger lives under the artifact root."""
    return Path(root) / model / FILE_NAME


def empty_ledger(model: str) -> dict[str, Any]:
    """A ledger with no versions yet."""
    return {"schema": SCHEMA, "model": model, "current": None, "previous": None, "versions": {}, "events": []}


def read_ledger(root: str | Path, model: str) -> dict[str, Any]:
    """Read ``model``'s ledger (an empty one when none exists yet); InstallError if it is unreadable."""
    path = ledger_path(root, model)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return empty_ledger(model)
    except (OSError, ValueError) as err:
        raise InstallError(f"the deployments ledger {str(path)!r} is unreadable ({err})",
                           model=model, fix="restore it from a backup or move it away to start a new history") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise InstallError(f"the deployments ledger {str(path)!r} has schema {found!r}, expected {SCHEMA}",
                           model=model, fix="upgrade lora-deploy or move the file away")
    return data


@contextmanager
def update_ledger(root: str | Path, model: str) -> Iterator[dict[str, Any]]:
    """Lock, read and yield ``model``'s ledger; write it back atomically when the block ends without error."""
    path = ledger_path(root, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{FILE_NAME}.lock").open("a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            ledger = read_ledger(root, model)
            yield ledger
            _write_atomic(path, ledger)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            json.dump(data, out, indent=2, sort_keys=False)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InstallError(f"cannot write the deployments ledger {str(path)!r}: {err.strerror}",
                           fix="check that the artifact root is writable and has space") from err


def add_event(ledger: dict[str, Any], action: str, version: str | None, *, from_version: str | None = None,
              reason: str = "", run_id: str | None = None) -> dict[str, Any]:
    """Append one event to the ledger and return it."""
    if action not in ACTIONS:
        raise ValueError(f"unknown ledger action {action!r}")
    event = {"at": now_iso(), "action": action, "version": version, "from_version": from_version,
             "reason": reason, "run_id": run_id}
    ledger["events"].append(event)
    return event


def record_install(ledger: dict[str, Any], version: str, *, adapter_time: str | None, files: list[dict[str, Any]],
                   run_id: str | None) -> dict[str, Any]:
    """Add (or refresh) ``version``'s entry with its installed files; keeps its health history and hf record."""
    entry = ledger["versions"].get(version) or {"version": version, "health": [], "hf": {}}
    entry.update({
        "version": version, "adapter_time": adapter_time, "installed_at": now_iso(), "dag_run_id": run_id,
        "files": [{"quant": f["quant"], "path": f["path"], "bytes": f["bytes"], "sha256": f["sha256"],
                   "bits_per_weight": f.get("bits_per_weight"), "perplexity": f.get("perplexity")} for f in files],
    })
    if entry.get("status") not in ("current",):
        entry["status"] = "installed"
    ledger["versions"][version] = entry
    add_event(ledger, "install", version, reason=f"{len(files)} file(s)", run_id=run_id)
    return entry


def version_entry(ledger: dict[str, Any], version: str, *, model: str) -> dict[str, Any]:
    """The entry of an installed version; InstallError listing the installed versions if unknown."""
    entry = ledger["versions"].get(version)
    if entry is None or entry.get("status") == "pruned":
        raise InstallError(f"version {version!r} is not installed; installed versions: {installed_versions(ledger)}",
                           model=model, fix="pick one of the installed versions (or deploy that adapter version)")
    return entry


def installed_versions(ledger: dict[str, Any]) -> list[str]:
    """Versions whose files are installed (not pruned), oldest adapter first."""
    items = [v for v in ledger["versions"].values() if v.get("status") != "pruned"]
    return [v["version"] for v in sorted(items, key=lambda v: (v.get("adapter_time") or "", v["version"]))]


def set_current(ledger: dict[str, Any], version: str | None, *, action: str, reason: str, run_id: str | None,
                failed: bool = False) -> dict[str, Any]:
    """Make ``version`` current (None: nothing), recompute ``previous`` and append the event.

    The replaced version becomes ``failed`` when ``failed`` (a rollback), else ``retired``.
    """
    old = ledger.get("current")
    if old and old in ledger["versions"] and old != version:
        ledger["versions"][old]["status"] = "failed" if failed else "retired"
    if version is not None:
        ledger["versions"][version]["status"] = "current"
    ledger["current"] = version
    event = add_event(ledger, action, version, from_version=old, reason=reason, run_id=run_id)
    ledger["previous"] = previous_candidate(ledger)
    return event


def previous_candidate(ledger: dict[str, Any]) -> str | None:
    """The version a rollback would restore: the last one current before the current one, still installed."""
    current = ledger.get("current")
    for event in reversed(ledger["events"]):
        if event["action"] not in ("promote", "rollback"):
            continue
        for candidate in (event["from_version"], event["version"]):
            entry = ledger["versions"].get(candidate or "")
            if candidate != current and entry is not None and entry.get("status") == "retired":
                return candidate
    return None


def append_health(ledger: dict[str, Any], version: str, report: dict[str, Any]) -> None:
    """Append a health report to ``version``'s history (ignored for a version the ledger does not know)."""
    entry = ledger["versions"].get(version)
    if entry is not None:
        entry.setdefault("health", []).append(report)


def is_newer(ledger: dict[str, Any], version: str, than: str | None) -> bool:
    """True when ``version``'s adapter time is later than ``than``'s (or there is nothing to compare with)."""
    if than is None or than not in ledger["versions"]:
        return True
    mine = ledger["versions"][version].get("adapter_time") or ""
    theirs = ledger["versions"][than].get("adapter_time") or ""
    return _as_time(mine) > _as_time(theirs)


def _as_time(value: str) -> datetime:
    if not value:
        return datetime.min.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
