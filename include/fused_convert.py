"""Merge fused into conversion: base model + LoRA adapter -> GGUF, without writing the merged model.

The pinned ``convert_hf_to_gguf.py`` runs in this process (its vendored gguf-py first on ``sys.path``) with
one change: its tensor index (``ModelBase.index_tensors``) hands out, for every base tensor the adapter
edits, a lazy tensor computed when the converter's stream reaches it, by the streaming merge's own
arithmetic (:func:`include.merge_math.output_jobs`: float64, one rounding to the base tensor's dtype).
Untouched tensors are read from the base as usual. The GGUF is therefore byte for byte the one
``merge_lora(base, adapter) -> convert`` gives (tests/include/test_fused_convert.py), at about the cost of
converting the base alone: one helper thread computes the next few merged tensors while the converter
writes the current one. Run it with ``OPENBLAS_NUM_THREADS=1`` (as include.gguf does): the r-wide
products are tiny and OpenBLAS's own threads only spin against the converter (measured 1.6x slower).

* :func:`check_fusable` validates the pair before anything runs (the merge stage calls it);
* :func:`merged_tensor` is the merged value of one edited tensor (the fidelity gate reuses it);
* ``python -m include.fused_convert --base B --adapter A --converter C [--pre NAME] -- ARGS`` is what
  :func:`include.gguf.convert_to_gguf` runs when given ``fused_adapter``.
"""

from __future__ import annotations

import runpy
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from include.errors import MergeError
from include.lora_adapter import AdapterInfo, TensorEdit, check_expected_base, inspect_adapter
from include.merge_math import check_edits
from include.safetensors_io import TensorInfo, list_model_tensors

PREFETCH = 3  # merged tensors computed ahead of the converter's stream, on one helper thread
FUSABLE_DTYPES = ("BF16", "F16", "F32")


def check_fusable(base_dir: Path, adapter_dir: Path, expected_base: str | None = None
                  ) -> tuple[AdapterInfo, dict[str, TensorInfo]]:
    """MergeError unless the adapter can be merged into ``base_dir`` inside the converter's stream."""
    adapter = inspect_adapter(Path(adapter_dir))
    if expected_base is not None:
        check_expected_base(adapter.base_model_name_or_path, expected_base, Path(adapter_dir))
    base = list_model_tensors(Path(base_dir))
    check_edits(adapter.edits, base, Path(base_dir))
    unsupported = sorted(k for k in adapter.edits if base[k].dtype not in FUSABLE_DTYPES)
    if unsupported:
        raise MergeError(f"the fused merge cannot edit tensors of dtype {base[unsupported[0]].dtype} "
                         f"({unsupported[:3]})", fix="use merge.backend: streaming")
    return adapter, base


def merged_tensor(info: TensorInfo, edit: TensorEdit) -> Any:
    """The merged tensor, as a torch tensor in the base tensor's dtype (exactly what merge_lora writes)."""
    import numpy as np
    import torch

    from include.merge_math import output_jobs

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    data = np.concatenate([job() for job in output_jobs(info, edit, info.dtype)])
    return torch.from_numpy(data).view(dtypes[info.dtype]).reshape(info.shape)


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


def main(argv: list[str] | None = None) -> int:
    """``--base B --adapter A --converter C [--pre NAME] -- CONVERTER_ARGS``; exit 2 on a merge error."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m include.fused_convert", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--converter", type=Path, required=True, help="convert_hf_to_gguf.py of the toolchain")
    parser.add_argument("--pre", help="pre-tokenizer name for an unknown BPE hash (quantize.pre_tokenizer)")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(args.converter.parent / "gguf-py"), str(args.converter.parent)]
    try:
        counters = install_merge(args.base, args.adapter)
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    if args.pre:
        from include.tokenizer_check import map_unknown_pre_tokenizer

        map_unknown_pre_tokenizer(args.pre)
    sys.argv = [str(args.converter), str(args.base), *rest]
    try:
        runpy.run_path(str(args.converter), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    if counters["merged"] != counters["edited"]:
        print(f"error: the fused conversion merged {counters['merged']} of {counters['edited']} edited tensors",
              file=sys.stderr, flush=True)
        return 2
    print(f"lora-deploy: merged {counters['merged']} tensors inside the conversion", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
