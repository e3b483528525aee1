"""GGUFCollectOperator: gather the mapped quantize results into one record and announce the GGUF asset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Asset, BaseOperator, Context

from include.units import format_bytes
from operators.common import gguf_files


def gguf_asset(model: str) -> Asset:
    """The asset a model's finished GGUFs stand for: ``lora-deploy://<model>/gguf``."""
    return Asset(uri=f"lora-deploy://{model}/gguf", name=f"{model}_gguf", group="lora-deploy")


def adapter_asset(model: str) -> Asset:
    """The asset a training job updates when a new adapter is ready: ``lora-deploy://<model>/adapter``."""
    return Asset(uri=f"lora-deploy://{model}/adapter", name=f"{model}_adapter", group="lora-deploy")


class GGUFCollectOperator(BaseOperator):
    """One record of every GGUF of this version (the full-precision file and each quant), as an asset event.

    The quantize task is mapped (one task instance per type); this task turns its results into a single
    ``{"version", "llama_cpp", "base", "files"}`` record for the install and publish stages, and emits an
    event on ``lora-deploy://<model>/gguf`` whose ``extra`` names the version and the files, so other DAGs
    can be scheduled on new GGUFs.

    :param model: the model's name in config/models.yaml.
    :param converted: the convert task's record. (templated)
    :param quantized: the mapped quantize task's records. (templated)
    :param adapter: the download record (``version``, ``time``). (templated)
    """

    template_fields: Sequence[str] = ("converted", "quantized", "adapter")
    ui_color = "#fff3e0"

    def __init__(self, *, model: str, converted: Any, quantized: Any, adapter: Any, **kwargs: Any) -> None:
        kwargs.setdefault("outlets", [gguf_asset(model)])
        super().__init__(**kwargs)
        self.model = model
        self.converted = converted
        self.quantized = quantized
        self.adapter = adapter

    def execute(self, context: Context) -> dict[str, Any]:
        """Collect, log a table of the files, emit the asset event."""
        quantized = self.quantized or []
        # One slice request for the mapped records: iterating a LazyXComSequence asks for one item past its end,
        # and the task SDK logs that 404 at ERROR in a healthy run.
        files = gguf_files(list(quantized[:] if isinstance(quantized, Sequence) else quantized))
        record = {"version": self.adapter["version"], "adapter_time": self.adapter.get("time"),
                  "llama_cpp": (self.converted or {}).get("llama_cpp"), "base": (self.converted or {}).get("base"),
                  "files": files}
        for item in files:
            self.log.info("%-8s %9s  %5.2f bits/weight  %s", item["quant"], format_bytes(item["bytes"]),
                          item.get("bits_per_weight") or 0.0, item["path"])
        extra = {"version": record["version"], "adapter_time": record["adapter_time"],
                 "files": [{k: f.get(k) for k in ("quant", "path", "bytes", "sha256", "bits_per_weight")}
                           for f in files]}
        context["outlet_events"][gguf_asset(self.model)].extra = extra
        return record
