"""Merge fused into conversion: base model + LoRA adapter -> GGUF, without writing the merged model.

The pinned ``convert_hf_to_gguf.py`` runs in this process (its vendored gguf-py first on ``sys.path``) with
one change: its tensor index (``ModelBase.index_tensors``) hands out, for every base tensor the adapter
edits, a lazy tensor computed when the converter's stream reaches it, by the streaming merge's own
arithmetic (:func:`include.merge.arithmetic.output_jobs`: float64, one rounding to the base tensor's dtype).
Untouched tensors are read from the base as usual. The GGUF is therefore byte for byte the one
``merge_lora(base, adapter) -> convert`` gives (tests/include/gguf/test_fused_convert.py), at about the cost of
converting the base alone: one helper thread computes the next few merged tensors while the converter
writes the current one. Run it with ``OPENBLAS_NUM_THREADS=1`` (as include.gguf.convert does): the r-wide
products are tiny and OpenBLAS's own threads only spin against the converter (measured 1.6x slower).

:func:`include.merge.fused.check_fusable` validates the pair before anything runs (the merge stage calls it);
``python -m include.cli.convert --base B --adapter A --converter C [--pre NAME] -- ARGS`` installs
:func:`install_merge` and runs the converter; :func:`include.gguf.convert.convert_to_gguf` starts it when given
``fused_adapter``.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from include.errors import MergeError
from include.merge.fused import check_fusable, merged_tensor

PREFETCH = 3  # merged tensors computed ahead of the converter's stream, on one helper thread


def install_merge(base_dir: Path, adapter_dir: Path) -> dict[str, int]:
    """Patch the (already importable) converter so edited base tensors come out merged; returns counters."""
    import conversion.base as conversion_base
    import torch

    adapter, base = check_fusable(base_dir, adapter_dir)
    counters = {"edited": len(adapter.edits), "merged": 0}
    lazy_cls = conversion_base.LazyTorchTensor
    original = conversion_base.ModelBase.index_tensors
    torch_dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    order: list[str] = []
    pending: dict[str, Future[Any]] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fused-merge")

    def compute(key: str) -> Any:
        counters["merged"] += 1
        if key in order:
            start = order.index(key) + 1
            for ahead in order[start:start + PREFETCH]:
                if ahead not in pending:
                    pending[ahead] = pool.submit(merged_tensor, base[ahead], adapter.edits[ahead])
        future = pending.pop(key, None)
        return future.result() if future is not None else merged_tensor(base[key], adapter.edits[key])

    def index_tensors(self: Any, remote_hf_model_id: str | None = None) -> dict[str, Any]:
        tensors = original(self, remote_hf_model_id=remote_hf_model_id)
        missing = sorted(set(adapter.edits) - set(tensors))
        if missing:
            raise MergeError(f"the converter does not read the edited tensors {missing[:3]}",
                             fix="use merge.backend: streaming (merge, then convert)")
        order[:] = [key for key in tensors if key in adapter.edits]
        for key in adapter.edits:
            info = base[key]
            if self.lazy:
                meta = lazy_cls.meta_with_dtype_and_shape(torch_dtypes[info.dtype], info.shape)
                tensors[key] = lambda k=key, m=meta: lazy_cls(meta=m, args=(k,), func=compute)
            else:
                tensors[key] = lambda k=key: compute(k)
        return tensors

    conversion_base.ModelBase.index_tensors = index_tensors
    return counters
