"""Memory: each stage's peak anonymous memory (the task process plus the tools it runs), from tensor headers.

Every estimate is ``fixed + k x (a size read from the headers)``, in bytes; the reasoning is next to each constant
and the calibration (the tiny test model and a Qwen2.5-1.5B-shaped model, bench/scale/stage_memory.py) is in
docs/operations.md. Sizes: *largest tensor* (elements; the embedding or the untied output head of a real model),
*decoder block* (its float32 bytes), the vocabulary ``V``, the prompts' tokens ``T`` and the contexts ``n_ctx``.
Anonymous memory only: the safetensors and GGUFs the tools read or map are file-backed pages, not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from include.plan.shapes import GGUFShape, ModelShape
from include.resources.guard import StageEstimate

if TYPE_CHECKING:
    from include.config.sections import FidelitySettings, ImatrixSettings

MB = 1_000_000
# An Airflow task process before its stage: task runner, the DAG file, config and operator modules (101 MB measured)
# plus room for the supervisor's messages and logging.
TASK_PROCESS = 150 * MB
# Light tasks (plan, download, install, promote, publish, live health, ggufs, retention): an SSH/SFTP or HTTP
# client and small records on top of the task process.
LIGHT_WORK = 100 * MB
# Merge, fused: the adapter is validated from its headers (7 MB measured at both shapes); streaming: float64 blocks
# of rows (8 MB each, a few in flight) and the adapter's A/B of the tensor being merged (~0.8 x the adapter's file
# measured at 1.5B: 1.0 here).
MERGE_FIXED = 25 * MB
MERGE_ADAPTER_FACTOR = 1.0
# Merge, peft: torch + transformers + peft, then the whole model in the merge dtype plus the shard being serialized
# (1.27 x the model's bytes measured at 1.5B: 1.35 here).
PEFT_FIXED = 260 * MB
PEFT_MODEL_FACTOR = 1.35
# The converter child (python + torch + gguf-py) and, in the task process meanwhile, transformers with the HF
# tokenizer of the token comparison: 506 MB measured with a tiny model. The converter materialises one tensor at a
# time: bf16 read -> float32 (4 bytes/element) -> float16 (2 bytes/element) => 6 bytes per element of the largest
# tensor (5.4 measured at 1.5B). A fused merge computes up to PREFETCH merged tensors ahead (stored dtype).
CONVERTER_FIXED = 460 * MB
CONVERTER_BYTES_PER_ELEMENT = 6
FUSED_PREFETCH = 3
# The fidelity gate's logits check in the task process: torch + transformers (258 MB measured), one decoder block in
# float32 (loaded just before it runs), and everything sized by T x V: float32 and float64 logits of the reference,
# llama.cpp's logits buffers, its scores array and its compute buffer's output, with the allocator's slack (36-38
# bytes per T x V measured at 1.5B and 7B: 40 here). T is unknown before tokenizing: CHARS_PER_TOKEN is a small-
# vocabulary worst case (1.6 measured with the generated 1000-piece tokenizer; real BPE vocabularies give ~4).
FIDELITY_FIXED = 270 * MB
FIDELITY_BYTES_PER_TOKEN_LOGIT = 40
CHARS_PER_TOKEN = 1.5
SPECIAL_TOKENS = 2
# Perplexity (llama.cpp over mmap): llama_cpp, then per n_ctx x V: the context's logits, the Python scores array,
# the compute buffer's output and the float64 blocks (14.9 bytes measured at 1.5B: 16 here).
LLAMA_FIXED = 20 * MB
PERPLEXITY_BYTES_PER_LOGIT = 16
# llama-imatrix: its context's logits and compute buffers per ctx_size x V (9.9 bytes measured), and a float32
# sum per column of every matrix.
IMATRIX_BYTES_PER_LOGIT = 10
# llama-quantize over mmap: the tensor being quantized converted to float32 (4 bytes/element) plus its output
# (<= 8.5 bits); the largest tensor decides (5.06-5.17 bytes/element measured at 1.5B).
QUANT_FIXED = 20 * MB
QUANT_F32_BYTES = 4
# The smoke check's llama.cpp server (weights through mmap, no repacking): python + llama_cpp.server (58 MB
# measured), the f16 KV cache for its n_ctx, and the compute buffer, whose pages a short prompt touches: logits
# rows x V x 4 bytes (219 rows' worth measured at 1.5B: 256 here).
SERVER_FIXED = 60 * MB
SERVER_N_CTX = 2048  # llama_cpp.server's default context
SERVER_LOGIT_ROWS = 256
GOAL_FIXED = 2_000 * MB
GOAL_LAYER_FACTOR = 1.5

_FIX_HEAVY = ("run it on a worker with more memory (workers.heavy_queue names the queue of merge, convert and "
              "quantize), free memory on this one, or raise workers.memory_budget_mb if it is set too low")


@dataclass(frozen=True)
class Dims:
    """What the llama.cpp formulas need, from a GGUF header or predicted from the safetensors."""

    largest_elements: int
    vocab: int
    layers: int
    kv_dim: int

    @classmethod
    def of(cls, shape: ModelShape | GGUFShape) -> Dims:
        """The dims of a model directory or a GGUF."""
        return cls(largest_elements=shape.largest_tensor[1], vocab=shape.vocab, layers=shape.layers,
                   kv_dim=shape.kv_dim)


def _estimate(stage: str, parts: dict[str, float], basis: str, fix: str) -> StageEstimate:
    return StageEstimate(stage=stage, peak_bytes=int(sum(parts.values())), parts={k: int(v) for k, v in parts.items()},
                         basis=basis, fix=fix)


def goal_bytes(shape: ModelShape) -> int:
    """The issue's bound on any task's peak: 2 GB + 1.5 x the largest layer in float32."""
    return int(GOAL_FIXED + GOAL_LAYER_FACTOR * shape.largest_layer[1])


def adapter_bytes(adapter_dir: Path) -> int:
    """Bytes of an adapter directory's files."""
    return sum(p.stat().st_size for p in Path(adapter_dir).iterdir() if p.is_file())


def light_estimate(stage: str) -> StageEstimate:
    """A light task: the task process and a client."""
    return _estimate(stage, {"task": TASK_PROCESS, "work": LIGHT_WORK}, "fixed",
                     "free memory on the worker or raise workers.memory_budget_mb")


def merge_estimate(shape: ModelShape, *, adapter_bytes: int, backend: str, dtype: str = "auto") -> StageEstimate:
    """The merge stage: fused (validation only), streaming (blocks of rows) or peft (the whole model)."""
    if backend == "fused":
        return _estimate("merge", {"task": TASK_PROCESS, "validation": MERGE_FIXED}, "adapter headers", _FIX_HEAVY)
    if backend in ("peft", "unsloth"):
        size = shape.parameters * {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 0) or shape.stored_bytes
        return _estimate("merge", {"task": TASK_PROCESS, "torch": PEFT_FIXED, "model": PEFT_MODEL_FACTOR * size},
                         f"the whole model in memory ({size / MB:,.0f} MB in {dtype})",
                         "use merge.backend: fused (the default) or streaming: both merge tensor by tensor; or "
                         + _FIX_HEAVY)
    return _estimate("merge", {"task": TASK_PROCESS, "blocks": MERGE_FIXED,
                               "adapter": MERGE_ADAPTER_FACTOR * adapter_bytes},
                     f"adapter {adapter_bytes / MB:,.0f} MB", _FIX_HEAVY)


def prompt_tokens(prompts: Sequence[str]) -> tuple[int, int]:
    """(all prompts' tokens, the longest prompt's), estimated from their length (see CHARS_PER_TOKEN)."""
    counts = [math.ceil(len(p) / CHARS_PER_TOKEN) + SPECIAL_TOKENS for p in prompts] or [0]
    return sum(counts), max(counts)


def perplexity_estimate(dims: Dims | GGUFShape | ModelShape, n_ctx: int, *, stage: str = "perplexity"
                        ) -> StageEstimate:
    """The perplexity gate alone (llama.cpp over mmap, ``n_ctx``-token chunks)."""
    dims = dims if isinstance(dims, Dims) else Dims.of(dims)
    return _estimate(stage, {"task": TASK_PROCESS, "llama_cpp": LLAMA_FIXED,
                             "logits": PERPLEXITY_BYTES_PER_LOGIT * n_ctx * dims.vocab},
                     f"n_ctx {n_ctx} x vocabulary {dims.vocab}", _FIX_HEAVY)


def imatrix_estimate(dims: Dims | GGUFShape | ModelShape, ctx_size: int) -> StageEstimate:
    """llama-imatrix over mmap."""
    dims = dims if isinstance(dims, Dims) else Dims.of(dims)
    return _estimate("imatrix", {"task": TASK_PROCESS, "llama_cpp": LLAMA_FIXED,
                                 "logits": IMATRIX_BYTES_PER_LOGIT * ctx_size * dims.vocab},
                     f"ctx {ctx_size} x vocabulary {dims.vocab}", _FIX_HEAVY)


def convert_phases(shape: ModelShape, *, fused: bool, fidelity: FidelitySettings | None,
                   imatrix: ImatrixSettings | None, largest_edited_bytes: int | None = None
                   ) -> dict[str, StageEstimate]:
    """The convert task's phases, each a peak of its own: the converter (with the token comparison), the fidelity
    gate's logits check and f16 perplexity (torch stays loaded once the logits ran), the importance matrix.

    ``fidelity``: a FidelitySettings (None or disabled: no gate); ``imatrix``: an ImatrixSettings (None or not
    configured: none). ``largest_edited_bytes``: the largest tensor the adapter edits (stored bytes; default: the
    largest decoder-block tensor in 16 bits).
    """
    name, largest = shape.largest_tensor
    parts: dict[str, float] = {"task": TASK_PROCESS, "converter": CONVERTER_FIXED,
                               "tensor": CONVERTER_BYTES_PER_ELEMENT * largest}
    if fused:
        edited = largest_edited_bytes if largest_edited_bytes is not None else 2 * shape.largest_block_tensor
        parts["prefetch"] = FUSED_PREFETCH * edited
    fix = _FIX_HEAVY + (f"; merge.backend: streaming saves the fused merge's read-ahead ({parts['prefetch'] / MB:,.0f} "
                        "MB) at the cost of a merged model on disk" if fused else "")
    phases = {"converter": _estimate("convert", parts, f"largest tensor {name} ({largest:,} elements)", fix)}
    gate = fidelity if fidelity is not None and fidelity.enabled else None
    torch = 0.0
    if gate is not None:
        tokens, _ = prompt_tokens(gate.prompts)
        block_name, block = shape.largest_block
        phases["logits"] = _estimate("convert", {
            "task": TASK_PROCESS, "torch": FIDELITY_FIXED, "block": 4 * block,
            "logits": FIDELITY_BYTES_PER_TOKEN_LOGIT * tokens * shape.vocab},
            f"decoder block {block_name} in float32, ~{tokens} prompt tokens x vocabulary {shape.vocab}",
            "set fidelity.mode: warn or shorten fidelity.prompts (the check needs T x V), or " + _FIX_HEAVY)
        torch = FIDELITY_FIXED
        ppl = perplexity_estimate(Dims.of(shape), gate.n_ctx, stage="convert")
        phases["perplexity"] = _estimate("convert", {**ppl.parts, "torch": torch}, ppl.basis,
                                         "lower fidelity.n_ctx, or " + _FIX_HEAVY)
    if imatrix is not None and imatrix.configured:
        found = imatrix_estimate(Dims.of(shape), imatrix.ctx_size)
        phases["imatrix"] = _estimate("convert", {**found.parts, "torch": torch,
                                                  "sums": shape.cols_total * 4}, found.basis,
                                      "lower quantize.imatrix.ctx_size, or " + _FIX_HEAVY)
    return phases


def convert_estimate(shape: ModelShape, *, fused: bool, fidelity: FidelitySettings | None,
                     imatrix: ImatrixSettings | None) -> StageEstimate:
    """The convert task's peak: the largest of :func:`convert_phases` (they run one after another)."""
    phases = convert_phases(shape, fused=fused, fidelity=fidelity, imatrix=imatrix)
    return max(phases.values(), key=lambda e: e.peak_bytes)


def quantize_tool_estimate(dims: Dims | GGUFShape | ModelShape, quant: str) -> StageEstimate:
    """llama-quantize of one type: the largest tensor in float32 plus its output."""
    from include.gguf.quant_types import approx_bits_per_weight, output_bits

    dims = dims if isinstance(dims, Dims) else Dims.of(dims)
    out = max(approx_bits_per_weight(quant), output_bits(quant)) / 8
    return _estimate("quantize", {"task": TASK_PROCESS, "llama_cpp": QUANT_FIXED,
                                  "tensor": (QUANT_F32_BYTES + out) * dims.largest_elements},
                     f"largest tensor {dims.largest_elements:,} elements", _FIX_HEAVY)


def quantize_estimate(dims: Dims | GGUFShape | ModelShape, quant: str, fidelity: FidelitySettings | None = None
                      ) -> StageEstimate:
    """One quantize task: llama-quantize, then (with the fidelity gate) the quant's perplexity."""
    tool = quantize_tool_estimate(dims, quant)
    if fidelity is None or not fidelity.enabled:
        return tool
    ppl = perplexity_estimate(dims, fidelity.n_ctx, stage="quantize")
    return max(tool, ppl, key=lambda e: e.peak_bytes)


def smoke_estimate(dims: Dims | GGUFShape | ModelShape, n_ctx: int = SERVER_N_CTX) -> StageEstimate:
    """The smoke check's llama.cpp server of one quant (weights through mmap)."""
    dims = dims if isinstance(dims, Dims) else Dims.of(dims)
    kv = 2 * n_ctx * dims.layers * dims.kv_dim * 2
    return _estimate("smoke", {"task": TASK_PROCESS, "server": SERVER_FIXED, "kv_cache": kv,
                               "compute": SERVER_LOGIT_ROWS * dims.vocab * 4},
                     f"KV cache {n_ctx} x {dims.layers} layers x {dims.kv_dim}, vocabulary {dims.vocab}",
                     "free memory on the worker that serves the smoke check (it runs where the LM Studio models "
                     "dir is), raise workers.memory_budget_mb if it is set too low")
