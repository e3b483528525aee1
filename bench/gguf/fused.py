"""Fused merge + conversion (prototype): adapter + base -> f16 GGUF without writing the merged model.

    python bench/gguf/fused.py --base BASE_DIR --adapter ADAPTER_DIR [--llama-cpp DIR] -- CONVERTER_ARGS...

Runs the pinned ``convert_hf_to_gguf.py`` in this process (its vendored gguf-py first on ``sys.path``)
with one change: the converter's tensor index (``ModelBase.index_tensors``) hands out, for every base
tensor the adapter edits, a lazy tensor whose data is computed when the converter's stream reaches it,
by the streaming merge's own arithmetic (:func:`include.merge_math.output_jobs`: float64, one rounding
to the base tensor's dtype). Untouched tensors are read from the base as usual. The GGUF is therefore
the one ``merge_lora(base, adapter) -> convert`` gives (tests/include/test_fidelity.py compares the
files byte for byte), at about the cost of converting the base alone: one helper thread computes the
next few merged tensors while the converter writes the current one (the converter itself is mostly
single-threaded), and OpenBLAS is kept to one thread. The adapter is validated first (``inspect_adapter`` and
``check_edits``, as the merge does); edits whose tensor the converter never indexes are an error.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# r-wide products are tiny: OpenBLAS's own threads only spin against the converter (measured 1.6x slower).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PREFETCH = 3  # merged tensors computed ahead of the converter's stream, on one helper thread

from include.lora_adapter import TensorEdit, inspect_adapter  # noqa: E402
from include.merge_math import check_edits, output_jobs  # noqa: E402
from include.safetensors_io import TensorInfo, list_model_tensors  # noqa: E402


def _merged_tensor(info: TensorInfo, edit: TensorEdit) -> Any:
    """The merged tensor as an eager torch tensor in the base tensor's dtype (what merge_lora writes)."""
    import numpy as np
    import torch

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    data = np.concatenate([job() for job in output_jobs(info, edit, info.dtype)])
    return torch.from_numpy(data).view(dtypes[info.dtype]).reshape(info.shape)


def install_merge(base_dir: Path, adapter_dir: Path) -> dict[str, int]:
    """Patch the (already imported) converter so edited base tensors come out merged; returns counters."""
    import conversion.base as conversion_base
    import torch

    adapter = inspect_adapter(adapter_dir)
    base = list_model_tensors(base_dir)
    check_edits(adapter.edits, base, base_dir)
    unsupported = sorted(k for k in adapter.edits if base[k].dtype not in ("BF16", "F16", "F32"))
    if unsupported:
        raise SystemExit(f"fused conversion: edited tensors with unsupported dtypes: {unsupported[:3]}")
    counters = {"edited": len(adapter.edits), "merged": 0}
    lazy_cls = conversion_base.LazyTorchTensor
    original = conversion_base.ModelBase.index_tensors
    torch_dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

    order: list[str] = []
    pending: dict[str, Future[Any]] = {}
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fused-merge")

    def compute(key: str) -> Any:
        """The merged tensor; the next few edited tensors (in index order) start computing meanwhile."""
        counters["merged"] += 1
        if key in order:
            start = order.index(key) + 1
            for ahead in order[start:start + PREFETCH]:
                if ahead not in pending:
                    pending[ahead] = pool.submit(_merged_tensor, base[ahead], adapter.edits[ahead])
        future = pending.pop(key, None)
        return future.result() if future is not None else _merged_tensor(base[key], adapter.edits[key])

    def index_tensors(self: Any, remote_hf_model_id: str | None = None) -> dict[str, Any]:
        tensors = original(self, remote_hf_model_id=remote_hf_model_id)
        missing = sorted(set(adapter.edits) - set(tensors))
        if missing:
            raise SystemExit(f"fused conversion: the converter does not index edited tensors {missing[:3]}; "
                             "merge first, then convert")
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
    """Parse arguments, patch the converter, run it on the base directory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="fused.py", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp tree (default: the pinned one)")
    args = parser.parse_args(argv)
    if args.llama_cpp is None:
        from include.toolchain import pinned_toolchain

        args.llama_cpp = pinned_toolchain().source_dir
    converter = args.llama_cpp / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(args.llama_cpp / "gguf-py"), str(args.llama_cpp)]
    counters = install_merge(args.base, args.adapter)
    sys.argv = [str(converter), str(args.base), *rest]
    try:
        runpy.run_path(str(converter), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise
    if counters["merged"] != counters["edited"]:
        raise SystemExit(f"fused conversion merged {counters['merged']} of {counters['edited']} edited tensors")
    print(f"fused conversion: merged {counters['merged']} tensors on the fly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
