"""LMStudioDeployOperator: install the quantized GGUFs into LM Studio's models tree, versioned and atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.lmstudio import install_ggufs
from operators._engine import engine_errors


class LMStudioDeployOperator(BaseOperator):
    """Install every quant of the GGUF record as ``<models_dir>/<publisher>/<repo>/<model>-<version>-<quant>.gguf``.

    Previous versions stay installed beside the new one.

    :param model: the model's name in config/models.yaml.
    :param ggufs: the GGUF stage's record (``files``). (templated)
    :param adapter: the download record (``version``). (templated)
    :param models_dir: LM Studio's models directory. (templated)
    :param publisher: first level under models_dir.
    :param repo: second level under models_dir.

    Returns ``{"models_dir", "directory", "version", "installed": [{"quant", "path", "identifier", ...}],
    "other_versions"}``.
    """

    template_fields: Sequence[str] = ("ggufs", "adapter", "models_dir")
    ui_color = "#e8f5e9"

    def __init__(self, *, model: str, ggufs: Any, adapter: Any, models_dir: str, publisher: str, repo: str,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.ggufs = ggufs
        self.adapter = adapter
        self.models_dir = models_dir
        self.publisher = publisher
        self.repo = repo

    def execute(self, context: Context) -> dict[str, Any]:
        """Install and return where each file went."""
        with engine_errors(self.model):
            return install_ggufs(self.ggufs["files"], models_dir=Path(self.models_dir), publisher=self.publisher,
                                 repo=self.repo, model=self.model, version=self.adapter["version"])
