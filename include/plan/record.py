"""The plan as a record: :class:`DeployPlan` (the XCom record and the text the plan task logs), :class:`DiskCheck`,
and the run's targets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from include.errors import ConfigError

TARGETS = ("lmstudio", "huggingface")
MB = 1e6


@dataclass
class DiskCheck:
    """Space one directory needs at the run's high-water mark against what its filesystem has free."""

    path: str
    need_bytes: int
    free_bytes: int
    parts: dict[str, int] = field(default_factory=dict)  # what the high-water mark adds up (name -> bytes)

    @property
    def ok(self) -> bool:
        """Whether the estimate fits, with 5% to spare."""
        return self.need_bytes * 1.05 <= self.free_bytes


@dataclass
class DeployPlan:
    """One run's plan; ``as_record()`` is its XCom record and ``text()`` the log/console form.

    ``memory`` has one entry per stage: ``{"stage", "peak_bytes", "parts", "basis", "fix", "where", "fits"}``
    (``where``: the worker it runs on, ``fits``: None when it is checked there rather than here); ``worker_memory``
    is what the plan's worker has (:meth:`include.resources.memory.WorkerMemory.as_record`); ``largest_layer`` and
    ``goal_bytes`` are the issue's bound (2 GB + 1.5 x the largest layer in float32).
    """

    model: str
    version: str
    adapter_time: str
    selected_by: str
    source: str
    base_model: str
    parameters: int
    merge_dtype: str
    quant_types: list[str]
    targets: list[str]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    disk: list[DiskCheck] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    worker_memory: dict[str, Any] | None = None
    largest_layer: dict[str, Any] | None = None
    goal_bytes: int | None = None
    lmstudio_dir: str | None = None
    hf_repo: str | None = None
    hf_space: str | None = None
    current_version: str | None = None
    already_deployed: bool = False
    dry_run: bool = False
    promote: bool = False
    instance_id: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_record(self) -> dict[str, Any]:
        """The plan as JSON-safe data (for XCom)."""
        record = asdict(self)
        record["disk"] = [{**asdict(d), "ok": d.ok} for d in self.disk]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DeployPlan:
        """The plan back from its XCom record (records of older versions lack the memory fields)."""
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        fields["disk"] = [DiskCheck(path=d["path"], need_bytes=d["need_bytes"], free_bytes=d["free_bytes"],
                                    parts=dict(d.get("parts") or {})) for d in record.get("disk", [])]
        return cls(**fields)

    def text(self) -> str:
        """A readable plan, one step a line."""
        lines = [f"plan for {self.model}: adapter {self.version} ({self.adapter_time}, selected by {self.selected_by})"
                 + (" [DRY RUN: nothing will be written]" if self.dry_run else ""),
                 f"  download  {self.version} from {self.source}",
                 f"  merge     into {self.base_model} (~{self.parameters / 1e6:.1f}M parameters, {self.merge_dtype})"]
        for out in self.outputs:
            lines.append(f"  produce   {out['name']:<8} ~{out['bytes'] / MB:,.1f} MB")
        if "lmstudio" in self.targets and self.lmstudio_dir:
            lines.append(f"  install   into {self.lmstudio_dir} (current now: {self.current_version or 'none'}; "
                         + ("promote requested)" if self.promote else "becomes current only if newer)"))
        if "huggingface" in self.targets and self.hf_repo:
            lines.append(f"  publish   to {self.hf_repo}" + (f" and Space {self.hf_space}" if self.hf_space else ""))
        lines += self._memory_lines()
        for check in self.disk:
            parts = " + ".join(f"{k} {v / MB:,.0f}" for k, v in check.parts.items() if v)
            lines.append(f"  disk      {check.path}: needs ~{check.need_bytes / MB:,.1f} MB at the run's high-water "
                         f"mark{f' ({parts} MB)' if parts else ''}, {check.free_bytes / MB:,.1f} MB free"
                         f"{'' if check.ok else '  <-- NOT ENOUGH'}")
        if self.already_deployed:
            lines.append(f"  note      {self.version} is already deployed")
        lines += [f"  warning   {w}" for w in self.warnings]
        return "\n".join(lines)

    def _memory_lines(self) -> list[str]:
        if not self.memory:
            return []
        worker = (self.worker_memory or {}).get("text") or "an unknown amount"
        lines = [f"  memory    peak anonymous memory per task (task process + its tools); this worker has {worker} "
                 "available"]
        for entry in self.memory:
            fits, now = entry.get("fits"), entry.get("fits_now")
            verdict = "  <-- DOES NOT FIT" if fits is False else "  <-- not now: waits" if now is False else ""
            where = f" [{entry['where']}]" if entry.get("where") else ""
            terms = " + ".join(f"{k} {v / MB:,.0f}" for k, v in entry.get("parts", {}).items() if v)
            lines.append(f"  memory    {entry['stage']:<9} ~{entry['peak_bytes'] / MB:,.0f} MB ({terms} MB){where}"
                         f"{verdict}")
        if self.largest_layer and self.goal_bytes:
            layer = self.largest_layer
            lines.append(f"  memory    goal: 2 GB + 1.5 x the largest layer ({layer['name']}, "
                         f"{layer['fp32_bytes'] / MB:,.0f} MB in float32) = {self.goal_bytes / MB:,.0f} MB")
        return lines


def check_targets(targets: list[str], *, has_hf: bool) -> list[str]:
    """The run's targets, validated: a subset of TARGETS; huggingface only when the model has an ``hf`` section."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"targets {targets!r} must be a non-empty subset of {list(TARGETS)}",
                          fix="pick targets in the trigger form or the run's conf")
    if "huggingface" in targets and not has_hf:
        return [t for t in targets if t != "huggingface"]
    return list(dict.fromkeys(targets))
