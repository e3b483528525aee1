"""The deploy plan: what one run would download, merge, produce, install and publish, and whether it fits.

Built before any stage writes anything, from the model's config, the selected checkpoint and the
deployments ledger. A dry run prints it and stops; a scheduled run whose adapter is already deployed
stops with it; every other run logs it and goes on. Sizes are estimates from the base model's tensor
headers and llama.cpp's bits per weight, so a run that cannot fit on disk fails in seconds, not after an
hour of merging.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from include.errors import ConfigError
from include.gguf.quant_types import approx_bits_per_weight

TARGETS = ("lmstudio", "huggingface")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class DiskCheck:
    """Space one directory needs for the run against what its filesystem has free."""

    path: str
    need_bytes: int
    free_bytes: int

    @property
    def ok(self) -> bool:
        """Whether the estimate fits, with 5% to spare."""
        return self.need_bytes * 1.05 <= self.free_bytes


@dataclass
class DeployPlan:
    """One run's plan; ``as_record()`` is its XCom record and ``text()`` the log/console form."""

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
        """The plan back from its XCom record."""
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        fields["disk"] = [DiskCheck(path=d["path"], need_bytes=d["need_bytes"], free_bytes=d["free_bytes"])
                          for d in record.get("disk", [])]
        return cls(**fields)

    def text(self) -> str:
        """A readable plan, one step a line."""
        mb = 1e6
        lines = [f"plan for {self.model}: adapter {self.version} ({self.adapter_time}, selected by {self.selected_by})"
                 + (" [DRY RUN: nothing will be written]" if self.dry_run else ""),
                 f"  download  {self.version} from {self.source}",
                 f"  merge     into {self.base_model} (~{self.parameters / 1e6:.1f}M parameters, {self.merge_dtype})"]
        for out in self.outputs:
            lines.append(f"  produce   {out['name']:<8} ~{out['bytes'] / mb:,.1f} MB")
        if "lmstudio" in self.targets and self.lmstudio_dir:
            lines.append(f"  install   into {self.lmstudio_dir} (current now: {self.current_version or 'none'}; "
                         + ("promote requested)" if self.promote else "becomes current only if newer)"))
        if "huggingface" in self.targets and self.hf_repo:
            lines.append(f"  publish   to {self.hf_repo}" + (f" and Space {self.hf_space}" if self.hf_space else ""))
        for check in self.disk:
            lines.append(f"  disk      {check.path}: needs ~{check.need_bytes / mb:,.1f} MB, "
                         f"{check.free_bytes / mb:,.1f} MB free{'' if check.ok else '  <-- NOT ENOUGH'}")
        if self.already_deployed:
            lines.append(f"  note      {self.version} is already deployed")
        lines += [f"  warning   {w}" for w in self.warnings]
        return "\n".join(lines)


def count_parameters(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes) of a model directory's safetensors, from their headers only."""
    from include.merge.safetensors_io import list_model_tensors

    tensors = list_model_tensors(model_dir)
    return (sum(math.prod(t.shape) for t in tensors.values()), sum(t.nbytes for t in tensors.values()))


def estimate_outputs(parameters: int, base_bytes: int, merge_dtype: str, outtype: str,
                     quant_types: list[str]) -> list[dict[str, Any]]:
    """The files the run produces with their estimated sizes: merged model, full-precision GGUF, quants.

    ``merge_dtype="fused"`` (``merge.backend: fused``): the merge happens inside the conversion, nothing merged
    is written.
    """
    if merge_dtype == "fused":
        merged = 0
    else:
        merged = parameters * _DTYPE_BYTES[merge_dtype] if merge_dtype in _DTYPE_BYTES else base_bytes
    outputs = [{"name": "merged", "bytes": merged},
               {"name": outtype.upper(), "bytes": int(parameters * approx_bits_per_weight(outtype) / 8)}]
    for quant in quant_types:
        if quant != outtype.upper():
            outputs.append({"name": quant, "bytes": int(parameters * approx_bits_per_weight(quant) / 8)})
    return outputs


def disk_check(path: Path, need_bytes: int) -> DiskCheck:
    """Free space on ``path``'s filesystem (its nearest existing parent) against ``need_bytes``."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return DiskCheck(path=str(path), need_bytes=int(need_bytes), free_bytes=shutil.disk_usage(probe).free)


def check_targets(targets: list[str], *, has_hf: bool) -> list[str]:
    """The run's targets, validated: a subset of TARGETS; huggingface only when the model has an ``hf`` section."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ConfigError(f"targets {targets!r} must be a non-empty subset of {list(TARGETS)}",
                          fix="pick targets in the trigger form or the run's conf")
    if "huggingface" in targets and not has_hf:
        return [t for t in targets if t != "huggingface"]
    return list(dict.fromkeys(targets))


def require_space(plan: DeployPlan) -> None:
    """ConfigError naming every directory whose filesystem lacks the space the plan estimates."""
    short = [d for d in plan.disk if not d.ok]
    if short:
        where = "; ".join(f"{d.path} needs ~{d.need_bytes / 1e6:,.0f} MB, has {d.free_bytes / 1e6:,.0f} MB free"
                          for d in short)
        raise ConfigError(f"not enough disk space for adapter {plan.version}: {where}",
                          fix="free space there, point settings.artifact_root / lmstudio.models_dir at a larger "
                              "disk, or deploy fewer quant types")
