"""The content-addressed artifact store: ``<root>/<model>/<stage>/<key>/`` with ``manifest.json`` written last.

A stage's key is a digest of everything its output depends on (input hashes, parameters, tool version).
A stage builds into a hidden temp directory beside its final place, renames it into place and only then
writes ``manifest.json``. So a directory without a manifest is never an input: it is the remains of a
killed attempt, removed by the next build of that key. A key whose manifest exists is returned at once:
re-runs, retries and backfills with the same inputs do no work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.store.hashing import digest_of, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TMP_MARK = ".tmp-"
_PARTIAL_MARK = ".partial-"


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
    """Stage outputs under one root, addressed by model, stage and input key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

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
        return self.root / model / stage / f"{_PARTIAL_MARK}{key}"

    def lookup(self, model: str, stage: str, key: str) -> StageResult | None:
        """The completed output for this key, or None (a directory without a valid manifest is not one)."""
        path = self.stage_dir(model, stage, key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return StageResult(path=path, manifest=manifest, reused=True)

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
        self._remove_stale_temps(final)
        tmp = final.parent / f".{key}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
            self._move_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _write_json_atomically(final / MANIFEST, manifest)
        log.info("%s/%s: wrote %s (%d files, %.1f MB)", model, stage, final, len(files), manifest["bytes"] / 1e6)
        return StageResult(path=final, manifest=manifest, reused=False)

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        if final.exists():
            # A manifest-less leftover of a killed attempt, or an output being replaced by force.
            trash = final.parent / f".{final.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)

    def _remove_stale_temps(self, final: Path) -> None:
        for candidate in final.parent.glob(f".{final.name}{_TMP_MARK}*"):
            owner = candidate.name.split(_TMP_MARK, 1)[1].split("-", 1)[0]
            if owner.isdigit() and pid_alive(int(owner)) and int(owner) != os.getpid():
                continue
            log.info("removing the remains of an interrupted build: %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)


def _describe_files(directory: Path, known: dict[str, str]) -> list[dict[str, Any]]:
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        files.append({"name": name, "bytes": path.stat().st_size, "sha256": known.get(name) or sha256_file(path)})
    return files


def _write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    with tmp.open("w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (so its temp files may still be in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
