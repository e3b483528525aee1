"""The download stage: pick a checkpoint, fetch its files (resuming), verify them, store them content-addressed.

Files gather in a stable staging directory of the artifact store (``<root>/<model>/adapter/.partial-<key>/``)
that survives a failed attempt, so the retry resumes where the link dropped. Files already complete there,
or stored under another adapter version with the same sha256, are not fetched again. Only when every
file matches the sha256 the source announced are they moved into the store's output for the key.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.errors import IntegrityError, SourceError
from include.source.transfer import summary
from include.source.types import AdapterSource, Checkpoint, SourceFile, TransferResult
from include.store.artifacts import ArtifactStore
from include.store.fileops import link_or_copy
from include.store.hashing import sha256_file
from include.units import format_bytes

log = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def select_checkpoint(checkpoints: list[Checkpoint], wanted: str | None, *, where: str,
                      not_after: datetime | None = None) -> Checkpoint:
    """The checkpoint named ``wanted``; else the newest not newer than ``not_after`` (when given); else the newest.

    Newest means by modification time, then by the number in the name.
    """
    if not checkpoints:
        raise SourceError(f"no checkpoints in {where}",
                          fix="check source.path / source.remote_dir and source.checkpoint_glob")
    if wanted:
        for checkpoint in checkpoints:
            if checkpoint.name == wanted:
                return checkpoint
        available = sorted((c.name for c in checkpoints), key=_natural_key)
        raise SourceError(f"adapter version {wanted!r} is not in {where}; available: {available}",
                          fix="trigger with one of the available versions, or leave adapter_version empty for the "
                              "newest")
    candidates = checkpoints
    if not_after is not None:
        limit = not_after.timestamp()
        candidates = [c for c in checkpoints if c.mtime <= limit]
        if not candidates:
            oldest = min(checkpoints, key=lambda c: (c.mtime, _natural_key(c.name)))
            raise SourceError(f"no checkpoint in {where} existed at {_iso(limit)} (the run's data interval end); "
                              f"the oldest is {oldest.name!r} from {_iso(oldest.mtime)}",
                              fix="backfill from a later date, or trigger with an explicit adapter_version")
    return max(candidates, key=lambda c: (c.mtime, _natural_key(c.name)))


def download_adapter(
    source: AdapterSource, store: ArtifactStore, model: str, *, version: str | None = None,
    not_after: datetime | None = None, force: bool = False, selected_by: str | None = None,
) -> dict[str, Any]:
    """Fetch one checkpoint into the store and return its XCom record (version, time, files with sha256).

    ``version`` names a checkpoint; else ``not_after`` (a backfill's data interval end) picks the newest
    checkpoint that existed then; else the newest. ``selected_by``: how the version was chosen, when the caller
    chose it (the deploy DAG's plan task passes the version it selected and says how); else derived from the above.
    """
    checkpoint = select_checkpoint(source.list_checkpoints(), version, where=source.description, not_after=not_after)
    selected_by = selected_by or ("conf" if version else "data_interval_end" if not_after is not None else "newest")
    files = sorted(source.list_files(checkpoint.name), key=lambda f: f.name)
    names = {f.name for f in files}
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        raise SourceError(
            f"checkpoint {checkpoint.name!r} in {source.description} has no {', '.join(missing)}",
            fix="point the source at a peft checkpoint saved with save_pretrained() (adapter_config.json + "
                "adapter_model.safetensors), or pick another adapter_version",
        )
    announced = [{"name": f.name, "bytes": f.bytes, "sha256": f.sha256} for f in files]
    log.info("checkpoint %s (%s, selected by %s): %d files, %s", checkpoint.name, _iso(checkpoint.mtime),
             selected_by, len(files), format_bytes(sum(f.bytes for f in files)))
    inputs = {"files": announced}
    fields = {"version": checkpoint.name, "time": _iso(checkpoint.mtime), "files": announced,
              "selected_by": selected_by}
    key = store.key_of(inputs)
    if not force and (found := store.lookup(model, "adapter", key)):
        log.info("%s/adapter: %s is already stored at %s", model, checkpoint.name, found.path)
        return found.record(**fields, transfer=None)

    staging = store.staging_dir(model, "adapter", key)
    staging.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = fetch_verified(source, store, model, checkpoint.name, files, staging)
    seconds = time.monotonic() - started

    def produce(tmp: Path) -> dict[str, Any]:
        for item in files:
            os.replace(staging / item.name, tmp / item.name)
        return {"version": checkpoint.name, "time": _iso(checkpoint.mtime)}

    stored = store.build(model, "adapter", inputs, produce, force=force,
                         known_sha256={f.name: f.sha256 for f in files})  # each one verified just above
    shutil.rmtree(staging, ignore_errors=True)
    return stored.record(**fields, transfer=summary(result, seconds))


def fetch_verified(source: AdapterSource, store: ArtifactStore, model: str, checkpoint: str,
                   files: list[SourceFile], staging: Path) -> TransferResult:
    """Make ``staging`` hold every file with its announced sha256: reuse, resume, fetch, verify, re-fetch once."""
    pending, reused = [], []
    for item in files:
        if _complete(staging / item.name, item) or _adopt(store, model, item, staging):
            reused.append(item.name)
        else:
            pending.append(item)
    if reused:
        log.info("not fetching again (same sha256 already here): %s", ", ".join(reused))
    result = TransferResult("none")
    if not pending:
        return result
    result = source.fetch(checkpoint, pending, staging)
    bad = _mismatches(staging, pending, result)
    if bad:
        for item in bad:
            log.warning("%s does not match the announced sha256 %s...: discarding it and fetching it again from the "
                        "start", item.name, item.sha256[:12])
            (staging / item.name).unlink(missing_ok=True)
        result.merge(source.fetch(checkpoint, bad, staging))
        still_bad = _mismatches(staging, bad, result)
        if still_bad:
            for item in still_bad:
                (staging / item.name).unlink(missing_ok=True)
            first = still_bad[0]
            raise IntegrityError(
                f"{first.name}: got sha256 {result.hashes.get(first.name, '?')[:12]}... twice, the source announced "
                f"{first.bytes} bytes sha256 {first.sha256[:12]}...",
                fix="the file changed on the box after it was hashed, or the link corrupts data; the task retries, "
                    "and if it persists check the file on the training box",
            )
    return result


def _complete(path: Path, item: SourceFile) -> bool:
    """True when ``path`` already holds the whole file; a full-size file with another hash is discarded."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < item.bytes:
        return False  # a partial file: the fetch resumes it
    if size == item.bytes and sha256_file(path) == item.sha256:
        return True
    log.warning("%s in the staging area is %d bytes and does not match the announced file: fetching it again",
                item.name, size)
    path.unlink()
    return False


def _adopt(store: ArtifactStore, model: str, item: SourceFile, staging: Path) -> bool:
    """Hard-link (or copy) a stored file with the same sha256 from another adapter version."""
    found = store.find_file(model, "adapter", item.sha256)
    if found is None:
        return False
    target = staging / item.name
    link_or_copy(found, target)
    if sha256_file(target) != item.sha256:  # the stored copy was damaged: never spread it
        target.unlink()
        return False
    return True


def _mismatches(staging: Path, files: list[SourceFile], result: TransferResult) -> list[SourceFile]:
    bad = []
    for item in files:
        path = staging / item.name
        size = path.stat().st_size if path.exists() else -1
        digest = result.hashes.get(item.name) or (sha256_file(path) if size >= 0 else "")
        if size != item.bytes or digest != item.sha256:
            bad.append(item)
    return bad


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
