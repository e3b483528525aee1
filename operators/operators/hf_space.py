"""HFSpaceDeployOperator (task ``publish``): the GGUFs to a Hugging Face model repo, then the model's Space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowSkipException

from include.config.sections import HFSettings
from operators.common import engine_errors, gguf_files, section
from operators.hooks.huggingface import HuggingFaceHook
from operators.links.huggingface import HFModelRepoLink, HFSpaceLink


class HFSpaceDeployOperator(BaseOperator):
    """Upload the GGUFs, a model card and ``lora-deploy.json`` in one commit tagged ``v-<version>``.

    A newer adapter version moves ``main`` and repoints the Space; an older one (a backfill, ordered by the
    adapter time of the download record) is only tagged; the same version again is a no-op. Skipped when
    ``settings`` is None (the model has no ``hf`` section). The token comes from the connection
    ``settings.conn_id`` through :class:`~operators.hooks.huggingface.HuggingFaceHook` (password; its host, if
    set, is the Hub endpoint) or ``HF_TOKEN``; it never reaches the log, the XCom or an uploaded file.

    :param model: the model's name in config/models.yaml.
    :param ggufs: the quantize stage's file records (mapped task output or ``{"files": [...]}``). (templated)
    :param adapter: the download record ``{"version", "time", "path", ...}``. (templated)
    :param settings: the model's ``hf`` section (or its ``model_dump()``), or None to skip.
    :param base_model: the base model, for the card's metadata.
    :param health: the smoke health report (``latency_s``, ``tokens_per_s``), for the card. (templated)
    :param converted: the convert record (``llama_cpp``, ``fidelity``), for the card. (templated)

    Returns ``{"repo_id", "repo_url", "version", "commit", "tag", "revision", "main_moved", "files", "space_id",
    "space_url", "space_action"}``.
    """

    template_fields: Sequence[str] = ("ggufs", "adapter", "health", "converted")
    operator_extra_links = (HFModelRepoLink(), HFSpaceLink())
    ui_color = "#fffde7"

    def __init__(self, *, model: str, ggufs: Any, adapter: Any, settings: HFSettings | Mapping[str, Any] | None,
                 base_model: str = "", health: Any = None, converted: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.ggufs = ggufs
        self.adapter = adapter
        self.settings = section(HFSettings, settings, model=model, name="hf") if settings else None
        self.base_model = base_model
        self.health = health
        self.converted = converted

    @cached_property
    def hook(self) -> HuggingFaceHook:
        """The Hub account of ``hf.conn_id``."""
        return HuggingFaceHook(self.settings.conn_id if self.settings else HuggingFaceHook.default_conn_name)

    def execute(self, context: Context) -> dict[str, Any]:
        """Publish, or skip when the model has no Hugging Face target."""
        s = self.settings
        if s is None:
            raise AirflowSkipException(f"model {self.model!r} has no `hf` section: nothing to publish")
        from include.hub.publish import HubTarget, publish_model

        with engine_errors(self.model):
            adapter = self.adapter if isinstance(self.adapter, dict) else {}
            version = str(adapter.get("version") or adapter.get("adapter_version") or "")
            credentials = self.hook.get_credentials()
            target = HubTarget(repo_id=s.repo_id, space_id=s.space_id, private=s.private, token=credentials.token,
                               endpoint=credentials.endpoint, space_hardware=s.space_hardware,
                               space_quant=s.space_quant, system_prompt=s.system_prompt, max_retries=s.max_retries)
            health = self.health if isinstance(self.health, dict) else {}
            card = {"base_model": self.base_model, "adapter_source": adapter.get("source") or adapter.get("path"),
                    "adapter_version": version, "health": {k: health.get(k) for k in ("latency_s", "tokens_per_s")
                                                           if health.get(k) is not None},
                    "converted": self.converted if isinstance(self.converted, dict) else None}
            record = publish_model(model=self.model, version=version, target=target,
                                   ggufs=gguf_files(self.ggufs), card=card, adapter_time=adapter.get("time"))
        self.log.info("published %s: commit %s, tag %s, main moved: %s, Space: %s", record["repo_id"],
                      record["commit"], record["tag"], record["main_moved"], record["space_action"] or "untouched")
        return record
