"""The deploy plan: what one run would download, merge, produce, install and publish, and whether it fits.

Built before any stage writes anything, from the model's config, the selected checkpoint, the base model's tensor
headers and the deployments ledger. A dry run prints it and stops; a scheduled run whose adapter is already
deployed stops with it; every other run logs it and goes on. Modules: ``record`` (the :class:`DeployPlan` record and
its text, targets), ``shapes`` (sizes from safetensors and GGUF headers), ``memory`` (each stage's peak anonymous
memory), ``disk`` (outputs and the artifact root's high-water mark). A run that cannot fit fails in seconds, not
after an hour of merging.
"""

from __future__ import annotations

from pathlib import Path

from include.plan.disk import disk_check, estimate_outputs, high_water, require_space, same_filesystem
from include.plan.record import TARGETS, DeployPlan, DiskCheck, check_targets
from include.plan.shapes import model_shape

__all__ = ["TARGETS", "DeployPlan", "DiskCheck", "check_targets", "count_parameters", "disk_check",
           "estimate_outputs", "high_water", "model_shape", "require_space", "same_filesystem"]


def count_parameters(model_dir: Path) -> tuple[int, int]:
    """(parameters, bytes) of a model directory's safetensors, from their headers only."""
    shape = model_shape(Path(model_dir))
    return shape.parameters, shape.stored_bytes
