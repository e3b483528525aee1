"""Disk: the files a run produces and the high-water mark of its artifact root, from tensor headers.

Every output of a run stays in the artifact store until the run's ``retention`` teardown (the f16 GGUF and a merged
model are intermediates it collects once the run delivered), so the artifact root's high-water mark is the sum of
what the run writes: the adapter, the merged model (``merge.backend`` streaming or peft; none when fused), the f16
GGUF, the importance matrix (when configured) and every quant. Installing into LM Studio adds nothing when its
models dir is on the same filesystem (hard links); across filesystems the installed quants are copied there, and
that filesystem needs their size. The sizes come from the base model's safetensors headers and the bits per weight
llama.cpp achieves (:func:`include.gguf.quant_types.gguf_bytes`); without headers (``shape=None``), from
parameters x the whole-model approximations.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from include.errors import ResourceError
from include.gguf.quant_types import approx_bits_per_weight, gguf_bytes
from include.plan.record import DeployPlan, DiskCheck
from include.plan.shapes import ModelShape

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
IMATRIX_BYTES_PER_TENSOR = 1024  # names and counts besides the 4-byte sums per column


def estimate_outputs(parameters: int, base_bytes: int, merge_dtype: str, outtype: str, quant_types: list[str],
                     shape: ModelShape | None = None, output_type: str | None = None) -> list[dict[str, Any]]:
    """The files the run produces with their estimated sizes: merged model, full-precision GGUF, quants.

    ``merge_dtype="fused"`` (``merge.backend: fused``): the merge happens inside the conversion, nothing merged
    is written. ``shape``: size the GGUFs from the headers (else parameters x approximate bits per weight);
    ``output_type``: ``quantize.output_tensor_type``.
    """
    if merge_dtype == "fused":
        merged = 0
    else:
        merged = parameters * _DTYPE_BYTES[merge_dtype] if merge_dtype in _DTYPE_BYTES else base_bytes

    def size(quant: str) -> int:
        if shape is None:
            return int(parameters * approx_bits_per_weight(quant) / 8)
        return gguf_bytes(quant, matrix_elements=shape.matrix_elements, vector_elements=shape.vector_elements,
                          output_elements=shape.head_elements or shape.embedding_elements, vocab=shape.vocab,
                          output_type=output_type)

    outputs = [{"name": "merged", "bytes": merged}, {"name": outtype.upper(), "bytes": size(outtype)}]
    for quant in quant_types:
        if quant != outtype.upper():
            outputs.append({"name": quant, "bytes": size(quant)})
    return outputs


def imatrix_bytes(shape: ModelShape) -> int:
    """Size of an importance matrix: a float32 sum per column of every 2-D tensor, plus names."""
    return shape.cols_total * 4 + shape.matrices * IMATRIX_BYTES_PER_TENSOR


def high_water(outputs: list[dict[str, Any]], *, adapter_bytes: int, imatrix: int = 0) -> dict[str, int]:
    """What the artifact root holds at the run's high-water mark (name -> bytes): everything the run writes."""
    parts = {"adapter": int(adapter_bytes)}
    parts.update({o["name"]: int(o["bytes"]) for o in outputs if o["bytes"]})
    if imatrix:
        parts["imatrix"] = int(imatrix)
    return parts


def disk_check(path: Path, need_bytes: int, parts: dict[str, int] | None = None) -> DiskCheck:
    """Free space on ``path``'s filesystem (its nearest existing parent) against ``need_bytes``."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return DiskCheck(path=str(path), need_bytes=int(need_bytes), free_bytes=shutil.disk_usage(probe).free,
                     parts=dict(parts or {}))


def same_filesystem(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (or their nearest existing parents) are on one filesystem (hard links work)."""
    def device(path: Path) -> int:
        while not path.exists() and path != path.parent:
            path = path.parent
        return path.stat().st_dev

    return device(Path(a)) == device(Path(b))


def require_space(plan: DeployPlan) -> None:
    """ResourceError (not retryable) naming every directory whose filesystem lacks the space the plan estimates."""
    short = [d for d in plan.disk if not d.ok]
    if short:
        where = "; ".join(f"{d.path} needs ~{d.need_bytes / 1e6:,.0f} MB, has {d.free_bytes / 1e6:,.0f} MB free"
                          + (f" ({' + '.join(f'{k} {v / 1e6:,.0f}' for k, v in d.parts.items() if v)} MB)"
                             if d.parts else "") for d in short)
        raise ResourceError(f"not enough disk space for adapter {plan.version}: {where}",
                            fix="free space there, point settings.artifact_root / lmstudio.models_dir at a larger "
                                "disk, deploy fewer quant types, or use merge.backend: fused (no merged model)")
