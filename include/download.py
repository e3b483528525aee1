"""The download stage: pick a checkpoint, fetch its files, verify them, store them content-addressed."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.artifacts import ArtifactStore
from include.errors import IntegrityError, SourceError
from include.hashing import sha256_file
from include.sources import AdapterSource, Checkpoint, SourceFile

log = logging.getLogger(__name__)

REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def select_checkpoint(checkpoints: list[Checkpoint], wanted: str | None, *, where: str) -> Checkpoint:
    """The checkpoint named ``wanted``, else the newest (by time, then by the number in its name)."""
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
    return max(checkpoints, key=lambda c: (c.mtime, _natural_key(c.name)))


def download_adapter(
    source: AdapterSource, store: ArtifactStore, model: str, *, version: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Fetch one checkpoint into the store and return its XCom record (version, time, files with sha256)."""
    checkpoint = select_checkpoint(source.list_checkpoints(), version, where=source.description)
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
    log.info("checkpoint %s (%s): %d files, %.1f MB", checkpoint.name, _iso(checkpoint.mtime), len(files),
             sum(f.bytes for f in files) / 1e6)

    def produce(tmp: Path) -> dict[str, Any]:
        source.fetch(checkpoint.name, files, tmp)
        verify_files(tmp, files)
        return {"version": checkpoint.name, "time": _iso(checkpoint.mtime)}

    result = store.build(model, "adapter", {"files": announced}, produce, force=force)
    return result.record(version=checkpoint.name, time=_iso(checkpoint.mtime), files=announced)


def verify_files(directory: Path, files: list[SourceFile]) -> None:
    """Check every fetched file's size and sha256 against what the source announced."""
    for item in files:
        path = directory / item.name
        size = path.stat().st_size
        digest = sha256_file(path)
        if size != item.bytes or digest != item.sha256:
            raise IntegrityError(
                f"{item.name}: got {size} bytes sha256 {digest[:12]}..., the source announced {item.bytes} bytes "
                f"sha256 {item.sha256[:12]}...",
                fix="the file changed or was corrupted in transit; the task retries, and if it persists check the "
                    "file on the training box",
            )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
