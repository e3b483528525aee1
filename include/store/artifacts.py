"""The content-addressed artifact store: ``<root>/<model>/<stage>/<key>/`` with ``manifest.json`` written last.

A stage's key is a digest of everything its output depends on (input hashes, parameters, tool version).
A stage builds into a hidden scratch directory beside its final place (:mod:`include.store.scratch`), renames it
into place and only then writes ``manifest.json``. So a directory without a manifest is never an input: it is the
remains of a killed attempt. A key whose manifest exists is returned at once: re-runs, retries and backfills with
the same inputs do no work.

Every build first sweeps its stage directory: scratch whose writer is gone (killed, crashed, on any host: the
writer's ``flock`` tells), manifest-less outputs nobody is finishing, and stale download resume caches. Every
lookup and build marks the entry as used by the current run (:mod:`include.store.leases`), which is what
:mod:`include.store.retention` asks before it collects anything.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.store import leases, scratch
from include.store.hashing import digest_of, sha256_file
from include.units import format_bytes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StageResult:
    """A completed stage output: where it is, its manifest, and whether it was reused."""

    path: Path
    manifest: dict[str, Any]
    reused: bool

    def record(self, **fields: Any) -> dict[str, Any]:
        """The small JSON record for XCom: path, key, sha256, bytes, reused, plus stage fields."""
        return {
            "path": str(self.path),
            "key": self.manifest["key"],
            "sha256": self.manifest["sha256"],
            "bytes": self.manifest["bytes"],
            "reused": self.reused,
            **fields,
        }


class ArtifactStore:
    """Stage outputs under one root, addressed by model, stage and input key.

    ``holder`` names who uses the entries this store object looks up or builds (default: the current run, see
    :func:`include.store.leases.current_holder`); ``stale_after_s`` is how long an untouched download resume cache
    is kept for a retry.
    """

    def __init__(self, root: str | Path, *, holder: str | None = None,
                 stale_after_s: float = scratch.DEFAULT_STALE_S) -> None:
        self.root = Path(root)
        self.holder = holder
        self.stale_after_s = stale_after_s

    def stage_dir(self, model: str, stage: str, key: str) -> Path:
        """The final directory of one stage output."""
        return self.root / model / stage / key

    @staticmethod
    def key_of(inputs: dict[str, Any]) -> str:
        """The key ``build`` gives these inputs."""
        return digest_of(inputs)

    def staging_dir(self, model: str, stage: str, key: str) -> Path:
        """A stable per-key directory for inputs gathered over several attempts (partial downloads).

        It survives a failed attempt (unlike ``build``'s temp dir) so a retry can resume; the caller
        removes it once the output is complete. It never counts as an output (hidden, no manifest).
        """
        return self.root / model / stage / scratch.resume_cache_name(key)

    def lookup(self, model: str, stage: str, key: str) -> StageResult | None:
        """The completed output for this key, or None (a directory without a valid manifest is not one).

        A found output is marked as used by this store's holder first; if collection removed it meanwhile, the
        answer is None, so the caller builds it again instead of reading a path that is gone.
        """
        path = self.stage_dir(model, stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        self.mark_used(model, stage, key)
        if not (path / MANIFEST).is_file():
            return None
        return StageResult(path=path, manifest=manifest, reused=True)

    def mark_used(self, model: str, stage: str, key: str) -> None:
        """Record that this store's holder uses ``<stage>/<key>`` now (see :mod:`include.store.leases`)."""
        try:
            leases.take(self.root / model, stage, key, self.holder)
        except OSError as err:  # a read-only store can still be read: collection is then not our concern
            log.warning("cannot mark %s/%s/%s as in use: %s", model, stage, key, err)

    def find_file(self, model: str, stage: str, sha256: str) -> Path | None:
        """A file with this sha256 in any completed output of the stage (for reuse instead of a new fetch)."""
        for manifest_path in sorted((self.root / model / stage).glob(f"*/{MANIFEST}")):
            try:
                files = json.loads(manifest_path.read_text()).get("files", [])
            except (OSError, ValueError):
                continue
            for entry in files:
                if entry.get("sha256") == sha256 and (manifest_path.parent / entry["name"]).is_file():
                    return manifest_path.parent / entry["name"]
        return None

    def build(
        self,
        model: str,
        stage: str,
        inputs: dict[str, Any],
        produce: Callable[[Path], dict[str, Any] | None],
        *,
        force: bool = False,
        known_sha256: dict[str, str] | None = None,
    ) -> StageResult:
        """Return the output for ``inputs``, calling ``produce(tmp_dir)`` only when it does not exist yet.

        ``produce`` writes files into the empty directory it is given and may return extra manifest fields.
        With ``force`` an existing output is rebuilt (and replaced only once the new one is complete).
        ``known_sha256`` (relative name -> sha256) spares re-reading files the caller has just verified; it is
        read after ``produce`` returns, so ``produce`` may fill it with the hashes of the files it wrote.
        """
        key = self.key_of(inputs)
        if not force and (found := self.lookup(model, stage, key)):
            log.info("%s/%s: reusing %s (inputs unchanged)", model, stage, found.path)
            return found
        final = self.stage_dir(model, stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        self.mark_used(model, stage, key)  # before the output exists: no collector may take it once it does
        self.sweep(model, stage)
        work = scratch.claim(final, "tmp")  # holds its lock (and produce's own scratch) until the manifest exists
        tmp = work / "out"
        tmp.mkdir()
        try:
            extra = produce(tmp) or {}
            files = _describe_files(tmp, known_sha256 or {})
            manifest = {
                **extra,  # stage fields first: the store's own fields below always win
                "model": model,
                "stage": stage,
                "key": key,
                "inputs": inputs,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": files,
                "bytes": sum(f["bytes"] for f in files),
                "sha256": digest_of(files, length=64),
            }
            _move_into_place(tmp, final)
            _write_json_atomically(final / MANIFEST, manifest)
        finally:
            scratch.discard(work)
        log.info("%s/%s: wrote %s (%d files, %s)", model, stage, final, len(files), format_bytes(manifest["bytes"]))
        return StageResult(path=final, manifest=manifest, reused=False)

    def sweep(self, model: str, stage: str, *, dry_run: bool = False) -> list[scratch.Swept]:
        """Remove the remains of killed builds from one stage directory; returns what went.

        Dead scratch of any key (with everything inside), download resume caches untouched for ``stale_after_s``, and
        output directories without a manifest whose builder is gone.
        """
        directory = self.root / model / stage
        swept = scratch.sweep(directory, resume_caches=True, stale_after_s=self.stale_after_s, dry_run=dry_run)
        for path in sorted(directory.iterdir()) if directory.is_dir() else ():
            if path.name.startswith(".") or not path.is_dir() or (path / MANIFEST).is_file():
                continue
            if _being_finished(path):
                continue
            swept.append(scratch.Swept(path, scratch.freed_bytes(path), "an output without a manifest"))
            if not dry_run:
                log.info("removing %s: an output without a manifest (its build was killed)", path)
                scratch.trash(path)
        return swept


def _move_into_place(tmp: Path, final: Path) -> None:
    if final.exists():
        # A manifest-less leftover of a killed attempt, or an output being replaced by force.
        scratch.trash(final)
    os.replace(tmp, final)


def _being_finished(final: Path) -> bool:
    """True while a live build of this key exists (it may have renamed its output into place and be writing the
    manifest)."""
    prefix = f".{final.name}.tmp-"
    return any(scratch.owner_alive(p) for p in final.parent.iterdir() if p.name.startswith(prefix))


def _describe_files(directory: Path, known: dict[str, str]) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        files.append({"name": name, "bytes": path.stat().st_size, "sha256": known.get(name) or sha256_file(path)})
    return files


def _write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    tmp = scratch.claim(path, "part", directory=False)
    try:
        with tmp.open("w") as handle:
            json.dump(value, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        scratch.finish(tmp, path)
    finally:
        scratch.discard(tmp)
