"""Checkpoints in a directory on this machine (or a mounted volume)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from include.errors import SourceError
from include.source.transfer import copy_fetch
from include.source.types import Checkpoint, SourceFile, TransferResult, check_name, wanted
from include.store.hashing import sha256_file


class LocalSource:
    """Checkpoints in a local directory."""

    def __init__(self, root: Path, checkpoint_glob: str = "checkpoint-*") -> None:
        self.root = Path(root)
        self.checkpoint_glob = checkpoint_glob
        self.description = f"local directory {str(self.root)!r}"

    def list_checkpoints(self) -> list[Checkpoint]:
        """Checkpoint directories matching the glob."""
        if not self.root.is_dir():
            raise SourceError(f"the adapter source directory {str(self.root)!r} does not exist",
                              fix="create it or correct source.path")
        return [Checkpoint(p.name, p.stat().st_mtime) for p in self.root.iterdir()
                if p.is_dir() and fnmatch.fnmatchcase(p.name, self.checkpoint_glob)]

    def list_files(self, checkpoint: str) -> list[SourceFile]:
        """The wanted files of a checkpoint, hashed here."""
        directory = self.root / check_name(checkpoint, "checkpoint")
        return [SourceFile(p.name, p.stat().st_size, sha256_file(p))
                for p in sorted(directory.iterdir()) if p.is_file() and wanted(p.name)]

    def fetch(self, checkpoint: str, files: list[SourceFile], dest: Path) -> TransferResult:
        """Copy the files into ``dest``."""
        for item in files:
            check_name(item.name, "file")
        return copy_fetch(self.root / check_name(checkpoint, "checkpoint"), files, dest)
