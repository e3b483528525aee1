"""The value types every source shares: checkpoints, announced files, what a fetch did, the source protocol.

A source lists checkpoint directories with their modification times, lists the files of one checkpoint
with the sha256 computed on the source side, and fetches those files into a staging directory, resuming
partial files (:mod:`include.source.transfer`). Which checkpoint to take and how to store it is
:mod:`include.source.download`'s job.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from include.errors import SourceError

# What a deploy needs from a checkpoint; optimizer and RNG states stay on the box.
WANTED_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer*", "special_tokens_map.json",
                "chat_template*", "added_tokens.json", "vocab.json", "merges.txt")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint directory on the source."""

    name: str
    mtime: float


@dataclass(frozen=True)
class SourceFile:
    """One file of a checkpoint as the source announces it."""

    name: str
    bytes: int
    sha256: str


class AdapterSource(Protocol):
    """What the download stage needs from any source."""

    description: str

    def list_checkpoints(self) -> list[Checkpoint]: ...

    def list_files(self, checkpoint: str) -> list[SourceFile]: ...

    def fetch(self, checkpoint: str, files: list[SourceFile], dest: Path) -> TransferResult: ...


def check_name(name: str, what: str) -> str:
    """Reject names that could escape a directory or reach a shell (``..``, ``/``, metacharacters)."""
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise SourceError(f"refusing {what} {name!r}: only letters, digits and ._+- are allowed in names",
                          fix="rename it on the training box")
    return name


def wanted(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WANTED_FILES)



@dataclass
class TransferResult:
    """What one fetch did: the method, bytes on the wire, bytes kept from partials, and the local sha256s."""

    method: str
    received_bytes: int = 0
    resumed_bytes: int = 0
    hashes: dict[str, str] = field(default_factory=dict)

    def merge(self, other: TransferResult) -> None:
        """Add a second pass (a re-fetch) to this result."""
        self.received_bytes += other.received_bytes
        self.hashes.update(other.hashes)
