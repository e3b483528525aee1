"""LMStudioDeployOperator: install the quantized GGUFs into LM Studio's models tree, versioned and atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.config.sections import LMStudioSettings
from include.units import format_bytes
from operators.common import engine_errors, gguf_files, section


def run_id_of(context: Context) -> str | None:
    """The DAG run's id (recorded in the ledger), or None outside a run."""
    run = context.get("dag_run")
    return getattr(run, "run_id", None) if run is not None else None


class LMStudioDeployOperator(BaseOperator):
    """Install every quant as ``<models_dir>/<publisher>/<repo>/<model>-<version>-<quant>.gguf`` (task ``install``).

    The models tree is ``lmstudio.models_dir`` or ``<LM Studio home>/models`` (home discovered). Installing the
    same version with the same bytes again is a no-op (ledger event ``noop``). Versions beyond
    ``lmstudio.keep_versions`` are pruned, never the current or previous one. Nothing becomes current here:
    that is the ``promote`` task's job, after the smoke test.

    :param model: the model's name in config/models.yaml.
    :param ggufs: the quantize stage's output (mapped per-quant records or ``{"files": [...]}``). (templated)
    :param adapter: the download record (``version``, ``time``). (templated)
    :param artifact_root: where the deployments ledger lives. (templated)
    :param settings: the model's ``lmstudio`` section (or its ``model_dump()``).

    Returns ``{"models_dir", "directory", "version", "adapter_time", "identifier",
    "installed": [{"quant", "path", "identifier", "bytes", "sha256", "linked"}], "pruned": [...], "noop"}``.
    """

    template_fields: Sequence[str] = ("ggufs", "adapter", "artifact_root")
    ui_color = "#e8f5e9"

    def __init__(self, *, model: str, ggufs: Any, adapter: Any, artifact_root: str,
                 settings: LMStudioSettings | Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.ggufs = ggufs
        self.adapter = adapter
        self.artifact_root = artifact_root
        self.settings = section(LMStudioSettings, settings, model=model, name="lmstudio")

    def execute(self, context: Context) -> dict[str, Any]:
        """Install, record in the ledger, prune; return the install record."""
        from include.lmstudio.deploy import deploy

        with engine_errors(self.model):
            record = deploy(gguf_files(self.ggufs), dict(self.adapter), model=self.model,
                            settings=self.settings.model_dump(),
                            artifact_root=str(self.artifact_root), run_id=run_id_of(context))
        if record["noop"]:
            self.log.info("%s %s: already installed with the same bytes, nothing changed", self.model,
                          record["version"])
        else:
            self.log.info("installed %s %s into %s: %s", self.model, record["version"], record["directory"],
                          ", ".join(f"{i['quant']} ({format_bytes(i['bytes'])}, "
                                    f"{'hard link' if i['linked'] else 'copy'})" for i in record["installed"]))
        for item in record["pruned"]:
            self.log.info("pruned old version %s (%d file(s))", item["version"], len(item["paths"]))
        return record
