"""What goes into a GGUF besides tensors, and whether the disk can hold the outputs (before any is written).

- :func:`gguf_metadata`: the converter's ``--metadata`` overrides (name, version, base model, toolchain).
- :func:`disk_preflight`: weights x approximate bits per weight of every requested type vs free space.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from include.errors import GGUFError
from include.gguf.quant_types import approx_bits_per_weight
from include.merge.base_model import public_base_name
from include.units import format_bytes

log = logging.getLogger(__name__)


def gguf_metadata(model: str, merged: dict[str, Any], adapter: dict[str, Any],
                  toolchain_version: str) -> dict[str, Any]:
    """The converter's ``--metadata`` overrides: name, fine-tune, version, base model, adapter version, toolchain."""
    version = str(merged.get("adapter_version") or adapter.get("version") or "")
    spec = str(merged.get("base_model") or adapter.get("base_model") or "")
    # The public name (a Hub id, else the directory's name): never this machine's path (see public_base_name).
    # The configured base's own files decide, not the merged copy's: streaming and fused merges name it the same.
    base_dir = spec if spec and Path(spec).expanduser().is_dir() else merged.get("path")
    base = public_base_name(spec, base_dir, adapter.get("path")) if spec or base_dir else None
    meta: dict[str, Any] = {
        "general.name": model,
        # Set, not guessed: the converter would otherwise read a fine-tune name out of the model directory's
        # name (the merge stage's store key), which differs between a merged dir and a fused conversion.
        "general.finetune": model,
        "general.version": version,
        "general.quantized_by": f"lora-deploy with {toolchain_version}",
        "general.description": f"{model}: LoRA adapter {version or '?'} merged into {base or '?'}; "
                               f"converted with {toolchain_version}",
    }
    if base:
        meta["general.base_models"] = [{"name": str(base)}]
    return meta


def estimate_weights(model_dir: Path) -> int:
    """Number of weights of a HF model directory, from its safetensors headers (no tensor data is read)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def disk_preflight(model_dir: Path, root: Path, quants: Sequence[str], *, outtype: str = "f16",
                   imatrix: bool = False, free_bytes: int | None = None, margin: float = 1.1) -> dict[str, Any]:
    """GGUFError before anything is written when ``root`` lacks space for the f16 and every quant.

    The estimate is weights x the types' approximate bits per weight (include.gguf.quant_types), plus 10 %.
    ``free_bytes`` defaults to the free space of ``root`` (or its nearest existing parent).
    """
    weights = estimate_weights(model_dir)
    sizes = {outtype.upper(): weights * approx_bits_per_weight(outtype) / 8}
    sizes.update({q: weights * approx_bits_per_weight(q) / 8 for q in quants})
    needed = int(sum(sizes.values()) * margin + (weights * 4 / 100 if imatrix else 0))
    if free_bytes is None:
        probe = Path(root)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_bytes = shutil.disk_usage(probe).free
    figures = {"weights": weights, "needed_bytes": needed, "free_bytes": free_bytes,
               "per_type_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()}}
    log.info("disk preflight: %s", figures)
    if needed > free_bytes:
        raise GGUFError(
            f"not enough disk space under {str(root)!r}: the GGUFs need about {format_bytes(needed)} "
            f"({', '.join(f'{k} {format_bytes(v)}' for k, v in sizes.items())}, +{margin - 1:.0%}), "
            f"only {format_bytes(free_bytes)} are free",
            fix="free space, move settings.artifact_root to a larger disk, or request fewer quant types",
        )
    return figures
