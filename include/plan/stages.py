"""Each stage's estimate from what its task has when it starts, and a whole run's from the base model alone.

- :func:`merge_stage`, :func:`convert_stage`, :func:`quantize_stage`, :func:`smoke_stage`: what a heavy operator
  checks its own worker against at the start of ``execute`` (the files it works on are there by then);
- :func:`run_estimates`: what the plan task estimates before anything is downloaded, from the base model's headers
  and the model's config (the adapter's size is bounded, the GGUFs' dims predicted from the safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from include.plan.memory import (
    Dims,
    adapter_bytes,
    convert_estimate,
    light_estimate,
    merge_estimate,
    quantize_estimate,
    smoke_estimate,
)
from include.plan.shapes import ModelShape, gguf_shape, model_shape
from include.resources.guard import StageEstimate

if TYPE_CHECKING:
    from include.config.sections import FidelitySettings, MergeSettings, QuantizeSettings

HEAVY_STAGES = ("merge", "convert", "quantize")  # the stages workers.heavy_queue sends to another worker
# An adapter is not on this machine when the plan runs: its size is bounded by a LoRA of this rank on every matrix
# of every decoder block, in float32 (r=16 all-linear measured 74 MB at the 1.5B shape; this bound gives 295 MB).
ASSUMED_RANK = 64


def adapter_bound(shape: ModelShape, rank: int = ASSUMED_RANK) -> int:
    """Upper bound of an adapter's bytes: A (rank x columns) and B (rows x rank) in float32 per block matrix."""
    return rank * shape.block_rows_cols * 4


def merge_path(merge: MergeSettings) -> tuple[str, bool]:
    """(the merge stage's backend for its estimate, whether the conversion merges) of a ``merge`` section.

    ``auto`` with dtype ``auto`` fuses when the adapter allows it, which is known only once it is downloaded: its
    merge is estimated as streaming (the larger) and its conversion as fused (the larger).
    """
    fused = merge.backend in ("fused", "auto") and merge.dtype == "auto"
    return ("streaming" if merge.backend == "auto" else merge.backend), fused


def run_estimates(shape: ModelShape, *, merge: MergeSettings, quantize: QuantizeSettings,
                  fidelity: FidelitySettings | None, quant_types: list[str], smoke: bool = True,
                  adapter_size: int | None = None) -> list[StageEstimate]:
    """Every stage of a run: download, merge, convert, the largest quantize task, smoke, the other light tasks."""
    backend, fused = merge_path(merge)
    adapter_size = adapter_bound(shape) if adapter_size is None else adapter_size
    dims = Dims.of(shape)
    gate = fidelity if fidelity is not None and fidelity.enabled else None
    out = [light_estimate("download"),
           merge_estimate(shape, adapter_bytes=adapter_size, backend=backend, dtype=merge.dtype),
           convert_estimate(shape, fused=fused, fidelity=gate, imatrix=quantize.imatrix)]
    quants = [quantize_estimate(dims, q, gate) for q in quant_types if q != quantize.outtype.upper()]
    if quants:
        out.append(max(quants, key=lambda e: e.peak_bytes))
    if smoke:
        out.append(smoke_estimate(dims))
    out.append(light_estimate("others"))
    return out


def merge_stage(base_dir: Path, adapter_dir: Path, merge: MergeSettings) -> StageEstimate:
    """The merge task's estimate (the adapter is downloaded by now)."""
    backend, _ = merge_path(merge)
    return merge_estimate(model_shape(base_dir), adapter_bytes=adapter_bytes(adapter_dir), backend=backend,
                          dtype=merge.dtype)


def convert_stage(model_dir: Path, fused_adapter: Path | str | None, quantize: QuantizeSettings,
                  fidelity: FidelitySettings | None) -> StageEstimate:
    """The convert task's estimate: ``model_dir`` is the merged model, or the base when ``fused_adapter`` is set."""
    gate = fidelity if fidelity is not None and fidelity.enabled else None
    return convert_estimate(model_shape(model_dir), fused=bool(fused_adapter), fidelity=gate, imatrix=quantize.imatrix)


def quantize_stage(f16_path: Path, quant: str, fidelity: FidelitySettings | None) -> StageEstimate:
    """One quantize task's estimate, from the f16 GGUF's header."""
    gate = fidelity if fidelity is not None and fidelity.enabled else None
    return quantize_estimate(Dims.of(gguf_shape(f16_path)), quant, gate)


def smoke_stage(gguf_path: Path) -> StageEstimate:
    """The smoke check's estimate, from the served GGUF's header."""
    return smoke_estimate(Dims.of(gguf_shape(gguf_path)))
