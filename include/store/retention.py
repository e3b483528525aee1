"""Retention: what the artifact store keeps after a deploy, and the collection of everything else.

Kept, for every version the LM Studio ledger keeps (its current, its previous and its newest
``lmstudio.keep_versions`` - the caller reads the ledger and passes :class:`Keep`):

- the quant GGUFs it installed (``product``), its adapter (``source``: the training box may be gone) and the
  fidelity figures of its files (``figures``: a few hundred bytes, and they spare a re-evaluation);
- its f16 GGUF, merged model and imatrix (``intermediate``) only with ``keep_intermediates``: they are rebuilt
  from the adapter when needed (a re-run, a new quant type).

Also kept, whatever the ledger says: every entry a run used less than ``lease_hours`` ago
(:mod:`include.store.leases`), unless that run is the one being finished (``release``). That protects the
builds in progress of other runs (a backfill beside a manual run, another Airflow sharing the volume) and the
intermediates of failed runs, so clearing their failed task still finds its inputs.

Everything else is removed: the entries of pruned versions, intermediates of delivered versions, outputs of runs
that failed more than ``lease_hours`` ago, outputs without a manifest, dead scratch (:mod:`include.store.scratch`)
and stale download resume caches. Each entry goes in one rename (to a trash scratch) and is checked for a lease
taken meanwhile before it is deleted, so a reader racing the collector either keeps it or rebuilds it.
One collector per model runs at a time (an ``flock`` on ``<root>/<model>/.collect.lock``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from include.store import leases, scratch
from include.store.artifacts import ArtifactStore
from include.store.lineage import INTERMEDIATE_STAGES, Entry, lineage, scan
from include.units import format_bytes

log = logging.getLogger(__name__)

COLLECT_LOCK = ".collect.lock"
RECORD_PATHS = 50  # paths listed in the XCom record (all of them are logged)


@dataclass(frozen=True)
class Keep:
    """What the ledger keeps: ``versions`` maps each kept version to the sha256 of its installed files."""

    versions: dict[str, set[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """The ``retention`` settings the collection applies."""

    keep_intermediates: bool = False
    lease_s: float = 24 * 3600.0


@dataclass(frozen=True)
class Item:
    """One path the collection removed (or kept), with its size and why."""

    path: str
    stage: str
    bytes: int
    freed: int
    reason: str


@dataclass
class RetentionReport:
    """What one collection did: removed and kept items, the run whose leases it released, dry run or not."""

    model: str
    dry_run: bool
    released: str | None = None
    released_leases: int = 0
    removed: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        """Bytes given back to the filesystem (a file still hard-linked from LM Studio frees nothing here)."""
        return sum(i.freed for i in self.removed)

    def record(self) -> dict[str, Any]:
        """The small JSON record for XCom."""
        return {
            "model": self.model, "dry_run": self.dry_run, "released": self.released,
            "released_leases": self.released_leases, "freed_bytes": self.freed_bytes,
            "removed_bytes": sum(i.bytes for i in self.removed), "removed_count": len(self.removed),
            "kept_bytes": sum(i.bytes for i in self.kept), "kept_count": len(self.kept),
            "removed": [{"path": i.path, "bytes": i.bytes, "reason": i.reason} for i in self.removed[:RECORD_PATHS]],
        }

    def summary(self) -> str:
        """One line for the task log."""
        verb = "would free" if self.dry_run else "freed"
        return (f"{self.model}: {verb} {format_bytes(self.freed_bytes)} in {len(self.removed)} path(s); kept "
                f"{format_bytes(sum(i.bytes for i in self.kept))} in {len(self.kept)} entr(ies)")


def apply_retention(root: str | Path, model: str, keep: Keep, policy: Policy, *, release: str | None = None,
                    dry_run: bool = False, now: float | None = None) -> RetentionReport:
    """Release ``release``'s leases (the finished run), then collect what ``keep`` and the leases do not protect.

    ``dry_run`` changes nothing (no lock file either) and reports what would go.
    """
    now = time.time() if now is None else now
    model_dir = Path(root) / model
    report = RetentionReport(model=model, dry_run=dry_run, released=release)
    if not model_dir.is_dir():
        return report
    with _collector(model_dir, dry_run):
        if release and not dry_run:
            report.released_leases = leases.release(model_dir, release)
        if not dry_run:
            leases.prune(model_dir, policy.lease_s, now=now)
        in_use = leases.fresh(model_dir, policy.lease_s, now=now)
        if release and dry_run:
            ignored = leases.holder_dir_name(release)
            in_use = {k: {h: a for h, a in v.items() if leases.holder_dir_name(h) != ignored}
                      for k, v in in_use.items()}
            in_use = {k: v for k, v in in_use.items() if v}
        entries, _ = scan(model_dir)
        found = lineage(entries, keep.versions)
        for entry in entries:
            _decide(report, model_dir, entry, found.role.get((entry.stage, entry.key)),
                    found.version.get((entry.stage, entry.key), ""), in_use, policy, dry_run, now)
        store = ArtifactStore(root, stale_after_s=policy.lease_s)
        for stage_dir in sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for gone in store.sweep(model, stage_dir.name, dry_run=dry_run):
                report.removed.append(Item(str(gone.path), stage_dir.name, gone.bytes, gone.bytes, gone.reason))
    for item in report.removed:
        log.info("%s %s (%s): %s", "would remove" if dry_run else "removed", item.path, format_bytes(item.bytes),
                 item.reason)
    log.info("%s", report.summary())
    return report


def _decide(report: RetentionReport, model_dir: Path, entry: Entry, role: str | None, version: str,
            in_use: dict[tuple[str, str], dict[str, float]], policy: Policy, dry_run: bool, now: float) -> None:
    size = scratch.disk_bytes(entry.path)
    holders = in_use.get((entry.stage, entry.key), {})
    if role in ("product", "source", "figures"):
        report.kept.append(Item(str(entry.path), entry.stage, size, 0, f"{role} of kept version {version}"))
        return
    if role == "intermediate" and policy.keep_intermediates:
        report.kept.append(Item(str(entry.path), entry.stage, size, 0,
                                f"intermediate of kept version {version} (retention.keep_intermediates)"))
        return
    if holders:
        holder, age = min(holders.items(), key=lambda item: item[1])
        report.kept.append(Item(str(entry.path), entry.stage, size, 0,
                                f"in use by {holder} (last used {age / 60:.0f} min ago)"))
        return
    if role == "intermediate":
        reason = f"intermediate of kept version {version}, which is delivered"
    else:
        reason = "no kept version uses it" + ("" if entry.stage not in INTERMEDIATE_STAGES else
                                              " (intermediate of a pruned or undelivered version)")
    freed = scratch.freed_bytes(entry.path)
    if dry_run or _remove_unless_leased(model_dir, entry, policy, now):
        report.removed.append(Item(str(entry.path), entry.stage, size, freed, reason))


def _remove_unless_leased(model_dir: Path, entry: Entry, policy: Policy, now: float) -> bool:
    """Rename the entry away, check that no lease appeared meanwhile (else put it back), then delete it."""
    spot = entry.path.parent / scratch.scratch_name(entry.path.name, "trash")
    try:
        os.replace(entry.path, spot)
    except FileNotFoundError:
        return False
    leased = leases.fresh(model_dir, policy.lease_s, now=max(now, time.time()), stage=entry.stage, key=entry.key)
    if leased and not entry.path.exists():
        os.replace(spot, entry.path)
        log.info("kept %s: a run started using it while it was being collected", entry.path)
        return False
    scratch.discard(spot)
    return True


@contextmanager
def _collector(model_dir: Path, dry_run: bool) -> Iterator[None]:
    """One collector per model at a time (a second one waits)."""
    if dry_run:
        yield
        return
    with (model_dir / COLLECT_LOCK).open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
