"""HFSpaceDeployOperator: publish the GGUFs to a Hugging Face model repo and update the model's Space."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowSkipException

from include.errors import PublishError
from operators._engine import engine_errors


class HFSpaceDeployOperator(BaseOperator):
    """Upload the GGUFs and a model card in one commit tagged with the adapter version; update the Space.

    Skipped when ``repo_id`` is empty (the model has no ``hf`` section). The token comes from the
    connection ``hf_conn_id`` (password; its host, if set, is the Hub endpoint) or ``HF_TOKEN``.

    :param model: the model's name in config/models.yaml.
    :param ggufs: the GGUF stage's record. (templated)
    :param adapter: the download record. (templated)
    :param health: the health report, for the model card. (templated)
    :param repo_id: the model repo, ``owner/name``, or None to skip.
    :param space_id: the Space, ``owner/name``, or None.
    :param private: create the repo private.
    :param hf_conn_id: the Airflow connection holding the token.
    :param base_model: the base model, for the card.

    Returns ``{"repo_id", "repo_url", "commit", "tag", "files", "space_id", "space_url"}``.
    """

    template_fields: Sequence[str] = ("ggufs", "adapter", "health")
    ui_color = "#fffde7"

    def __init__(
        self,
        *,
        model: str,
        ggufs: Any,
        adapter: Any,
        health: Any = None,
        repo_id: str | None,
        space_id: str | None = None,
        private: bool = True,
        hf_conn_id: str = "huggingface_default",
        base_model: str = "",
        space_hardware: str = "cpu-basic",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.ggufs = ggufs
        self.adapter = adapter
        self.health = health
        self.repo_id = repo_id
        self.space_id = space_id
        self.private = private
        self.hf_conn_id = hf_conn_id
        self.base_model = base_model
        self.space_hardware = space_hardware

    def execute(self, context: Context) -> dict[str, Any]:
        """Publish, or skip when the model has no Hugging Face target."""
        if not self.repo_id:
            raise AirflowSkipException(f"model {self.model!r} has no `hf` section: nothing to publish")
        from include.hfhub import HubTarget, publish_model

        with engine_errors(self.model):
            token, endpoint = self._credentials()
            target = HubTarget(repo_id=self.repo_id, space_id=self.space_id, private=self.private, token=token,
                               endpoint=endpoint, space_hardware=self.space_hardware)
            card = {"base_model": self.base_model, "adapter_source": self.adapter.get("path", ""),
                    "adapter_version": self.adapter["version"], "health": self.health or {}}
            return publish_model(model=self.model, version=self.adapter["version"], target=target,
                                 ggufs=self.ggufs["files"], card=card)

    def _credentials(self) -> tuple[str, str | None]:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = BaseHook.get_connection(self.hf_conn_id)
        except AirflowNotFoundException:
            conn = None
        token = (conn.password if conn else None) or os.environ.get("HF_TOKEN")
        if not token:
            raise PublishError(f"no Hugging Face token: connection {self.hf_conn_id!r} is missing and HF_TOKEN is "
                               "unset",
                               fix=f"create the connection {self.hf_conn_id!r} with the token as password (write "
                                   "scope), or set HF_TOKEN")
        endpoint = (conn.host if conn and conn.host else None) or os.environ.get("HF_ENDPOINT")
        return token, endpoint
