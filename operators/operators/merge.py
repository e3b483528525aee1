"""MergeOperator: merge the downloaded LoRA adapter into the base model (streaming, tensor by tensor)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.config.sections import MergeSettings
from include.merge.base_model import fingerprint, resolve_base_model
from include.store.artifacts import ArtifactStore
from include.store.hashing import digest_of
from operators.common import as_bool, engine_errors, memory_guard, section, workers_section

MERGE_ENGINE_VERSION = "2"  # 2: float64 merge math, DoRA/bias/embedding/modules_to_save


class MergeOperator(BaseOperator):
    """Merge an adapter (the download stage's record) into ``base_model``; reuse an identical earlier merge.

    :param model: the model's name in config/models.yaml.
    :param adapter: the download record (``path``, ``sha256``, ``version``). (templated)
    :param base_model: a local model directory or a Hugging Face repo id in the local cache. (templated)
    :param artifact_root: root of the artifact store. (templated)
    :param dtype: output dtype: auto, float32, float16 or bfloat16 (``merge.dtype``).
    :param backend: streaming (exact, constant memory), fused, peft, unsloth (CUDA only) or auto (``merge.backend``).
    :param max_shard_mb: largest output shard (``merge.max_shard_mb``).

    ``dtype``, ``backend`` and ``max_shard_mb`` are the ``merge`` section's fields, validated by it; one left out
    (None) takes the section's default.
    :param force: merge again even if this merge exists. (templated)
    :param workers: the model's ``workers`` section: the memory budget the stage's estimate must fit (checked at
        the start of ``execute`` on the worker running it; an OOM kill fails the task without retries).

    With ``backend="fused"`` nothing is merged here: the adapter is validated against the base and the record
    points the convert stage at the base (``path``) and the adapter (``fused_adapter``), which it merges inside
    the conversion; ``sha256`` is then the digest of the merge's inputs (it names the merged content).

    Returns ``{"path", "key", "sha256", "bytes", "dtype", "adapter_version", "base_model", "reused"}``
    (+ ``fused_adapter``).
    """

    template_fields: Sequence[str] = ("adapter", "base_model", "artifact_root", "force")
    ui_color = "#ede7f6"

    def __init__(
        self,
        *,
        model: str,
        adapter: Any,
        base_model: str,
        artifact_root: str,
        dtype: str | None = None,
        backend: str | None = None,
        max_shard_mb: int | None = None,
        force: bool | str = False,
        workers: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.adapter = adapter
        self.base_model = base_model
        self.artifact_root = artifact_root
        chosen = {"dtype": dtype, "backend": backend, "max_shard_mb": max_shard_mb}
        self.settings = section(MergeSettings, {k: v for k, v in chosen.items() if v is not None}, model=model,
                                name="merge")
        self.force = force
        self.workers = workers_section(workers, model=model)

    def execute(self, context: Context) -> dict[str, Any]:
        """Validate, merge into a temp dir of the store, return the record."""
        from include.merge.backends import choose_backend, merge_model
        from include.plan.stages import merge_stage

        with engine_errors(self.model), memory_guard(self, context, "merge", lambda: merge_stage(
                resolve_base_model(self.base_model), Path(self.adapter["path"]), self.settings)):
            base_dir = resolve_base_model(self.base_model)
            adapter_dir = Path(self.adapter["path"])
            s = self.settings
            if s.backend == "fused" or (s.backend == "auto" and s.dtype == "auto" and _fusable(base_dir, adapter_dir)):
                return self._fused(base_dir, adapter_dir)
            backend = choose_backend(s.backend, adapter_dir)
            inputs = {"adapter": self.adapter["sha256"], "base": fingerprint(base_dir), "dtype": s.dtype,
                      "max_shard_mb": s.max_shard_mb, "engine": f"{backend}-{MERGE_ENGINE_VERSION}"}

            def produce(tmp: Path) -> dict[str, Any]:
                return merge_model(base_dir, adapter_dir, tmp, backend=backend, dtype=s.dtype,
                                   expected_base=self.base_model, max_shard_bytes=s.max_shard_mb * 1024 * 1024)

            result = ArtifactStore(self.artifact_root).build(self.model, "merged", inputs, produce,
                                                             force=as_bool(self.force))
        return result.record(dtype=result.manifest.get("dtype", s.dtype), adapter_version=self.adapter["version"],
                             base_model=self.base_model, backend=result.manifest.get("backend", backend))

    def _fused(self, base_dir: Path, adapter_dir: Path) -> dict[str, Any]:
        """Backend ``fused``: validate now, merge later inside the conversion; nothing is written here."""
        from include.merge.fused import check_fusable

        adapter, base = check_fusable(base_dir, adapter_dir, expected_base=self.base_model)
        inputs = {"adapter": self.adapter["sha256"], "base": fingerprint(base_dir), "dtype": "auto",
                  "engine": f"fused-{MERGE_ENGINE_VERSION}"}
        key = digest_of(inputs, length=64)
        self.log.info("fused merge: %d tensors of %s (%s) will be merged inside the conversion; no merged model is "
                      "written", len(adapter.edits), base_dir, ", ".join(adapter.features))
        dtypes = {info.dtype for info in base.values()}
        return {"path": str(base_dir), "fused_adapter": str(adapter_dir), "key": key, "sha256": key, "bytes": 0,
                "dtype": dtypes.pop() if len(dtypes) == 1 else "auto", "adapter_version": self.adapter["version"],
                "base_model": self.base_model, "backend": "fused", "reused": False}


def _fusable(base_dir: Path, adapter_dir: Path) -> bool:
    """Backend ``auto``: True when the merge can be fused into the conversion (no merged model on disk)."""
    from include.errors import MergeError
    from include.merge.fused import check_fusable

    try:
        check_fusable(base_dir, adapter_dir)
    except MergeError:
        return False
    return True
