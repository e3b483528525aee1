"""Which store entries a kept version needs: its lineage, read from the manifests alone.

Every manifest names what it was made from (``inputs``: the sha256 of the input files or records) and what it
holds (``sha256`` of the record, ``sha256`` of each file, ``gguf.sha256``). Starting from the sha256 of a kept
version's installed files (its quant GGUFs), the lineage walks the inputs back: quant -> f16 GGUF (+ imatrix) ->
merged model -> adapter. The adapter of a version is also found by its version name (a fused merge writes no
merged model, so nothing names the adapter's sha256). Figures (``fidelity``) computed from any file of a lineage
belong to it as well.

No stage is special-cased by its inputs' key names, only by the stage's role (:data:`INTERMEDIATE_STAGES`,
:data:`FIGURE_STAGES`), so a new input (another quality gate's file) joins the walk by itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SOURCE_STAGES = ("adapter",)  # kept with their version: the training box may be gone
INTERMEDIATE_STAGES = ("merged", "gguf", "imatrix")  # rebuilt from the adapter on demand
FIGURE_STAGES = ("fidelity",)  # a few hundred bytes: kept with the lineage they describe


@dataclass(frozen=True)
class Entry:
    """One completed store output: ``<root>/<model>/<stage>/<key>/`` and its manifest."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def products(self) -> set[str]:
        """The sha256 values this entry holds: its record digest, each file, its GGUF (and shards)."""
        found = {self.manifest.get("sha256")} | {f.get("sha256") for f in self.manifest.get("files", [])}
        gguf = self.manifest.get("gguf") or {}
        found |= {gguf.get("sha256")} | {s.get("sha256") for s in gguf.get("shards") or []}
        return {s for s in found if isinstance(s, str)}

    @property
    def references(self) -> set[str]:
        """Every sha256 named in this entry's inputs (what it was made from), except its own files' (a download's
        inputs are the very files it holds, some of which other versions share, like a README)."""
        return set(_hashes(self.manifest.get("inputs"))) - self.products

    @property
    def version(self) -> str | None:
        """The adapter version an adapter entry holds."""
        value = self.manifest.get("version")
        return value if isinstance(value, str) else None


def _hashes(value: Any) -> Iterator[str]:
    if isinstance(value, str) and SHA256.match(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _hashes(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _hashes(item)


def scan(model_dir: Path) -> tuple[list[Entry], list[Path]]:
    """Completed entries of every stage of one model, and output directories without a (valid) manifest."""
    entries: list[Entry] = []
    orphans: list[Path] = []
    for stage_dir in sorted(p for p in Path(model_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                manifest = json.loads((path / MANIFEST).read_text())
            except (OSError, ValueError):
                orphans.append(path)
                continue
            if isinstance(manifest, dict):
                entries.append(Entry(stage_dir.name, path.name, path, manifest))
            else:
                orphans.append(path)
    return entries, orphans


@dataclass
class Lineage:
    """Why each entry is needed: ``role[(stage, key)]`` is ``product``, ``source``, ``intermediate`` or ``figures``,
    and ``version[(stage, key)]`` the kept version it serves."""

    role: dict[tuple[str, str], str] = field(default_factory=dict)
    version: dict[tuple[str, str], str] = field(default_factory=dict)


def lineage(entries: list[Entry], versions: dict[str, set[str]]) -> Lineage:
    """The lineage of the kept ``versions`` (version -> sha256 of its installed files) among ``entries``."""
    found = Lineage()
    by_product: dict[str, list[Entry]] = {}
    for entry in entries:
        for sha in entry.products:
            by_product.setdefault(sha, []).append(entry)
    frontier: list[tuple[Entry, str]] = []
    for version, shas in sorted(versions.items()):
        for sha in sorted(shas):
            for entry in by_product.get(sha, []):
                frontier += _mark(found, entry, "product", version)
        for entry in entries:
            if entry.stage in SOURCE_STAGES and entry.version == version:
                frontier += _mark(found, entry, "source", version)
    while frontier:  # walk the inputs back
        entry, version = frontier.pop()
        for sha in sorted(entry.references):
            for parent in by_product.get(sha, []):
                role = "source" if parent.stage in SOURCE_STAGES else "intermediate"
                frontier += _mark(found, parent, role, version)
    owner = {sha: found.version[(e.stage, e.key)] for e in entries if (e.stage, e.key) in found.role
             for sha in e.products}
    owner |= {sha: version for version, shas in versions.items() for sha in shas}
    for entry in entries:  # figures computed from any file of a lineage
        key = (entry.stage, entry.key)
        about = sorted(entry.references & owner.keys())
        if entry.stage in FIGURE_STAGES and key not in found.role and about:
            found.role[key] = "figures"
            found.version[key] = owner[about[0]]
    return found


def _mark(found: Lineage, entry: Entry, role: str, version: str) -> list[tuple[Entry, str]]:
    key = (entry.stage, entry.key)
    if key in found.role:
        if _rank(role) > _rank(found.role[key]):  # a file installed by one version, intermediate of another
            found.role[key] = role
        return []
    found.role[key] = role
    found.version[key] = version
    return [(entry, version)]


def _rank(role: str) -> int:
    return {"figures": 0, "intermediate": 1, "source": 2, "product": 3}[role]
