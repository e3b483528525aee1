"""The merge computed on demand: one edited tensor's merged value, for consumers that never write a merged model.

The fused conversion (:mod:`include.gguf.fused_convert`) and the fidelity gate's layer-streamed reference
ask for each edited base tensor when they reach it; the value is the streaming merge's own arithmetic
(:func:`include.merge.arithmetic.output_jobs`: float64, one rounding to the base tensor's dtype), so it is
byte for byte what :func:`include.merge.streaming.merge_lora` writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from include.errors import MergeError
from include.merge.adapter import AdapterInfo, TensorEdit, check_expected_base, inspect_adapter
from include.merge.arithmetic import check_edits
from include.merge.safetensors_io import TensorInfo, list_model_tensors

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

    from include.merge.arithmetic import output_jobs

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    data = np.concatenate([job() for job in output_jobs(info, edit, info.dtype)])
    return torch.from_numpy(data).view(dtypes[info.dtype]).reshape(info.shape)


def merged_rows(info: TensorInfo, edit: TensorEdit) -> Callable[[int, int], Any]:
    """A reader of rows ``start:stop`` of the merged tensor (torch, base dtype), equal to those of merged_tensor.

    For consumers that need a few rows of a large tensor (the fidelity gate's embedding rows and output-head
    chunks): only the rows asked for are read and merged, by the same arithmetic.
    """
    import torch

    from include.merge.arithmetic import _Merger

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    merger = _Merger(info, edit)

    def rows(start: int, stop: int) -> Any:
        data = merger.output(slice(start, stop), info.dtype)
        return torch.from_numpy(data).view(dtypes[info.dtype]).reshape((stop - start, *info.shape[1:]))

    return rows
