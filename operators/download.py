"""VastAIDownloadOperator: fetch one adapter checkpoint from the training box into the artifact store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.artifacts import ArtifactStore
from include.download import download_adapter
from include.sources import LocalSource, SSHSource
from operators._engine import engine_errors


class VastAIDownloadOperator(BaseOperator):
    """Download an adapter checkpoint (the one named in ``adapter_version``, else the newest).

    :param model: the model's name in config/models.yaml.
    :param artifact_root: root of the artifact store. (templated)
    :param source_kind: ``"local"`` (a directory here) or ``"ssh"`` (an SSH connection + remote directory).
    :param source_path: the local directory holding ``checkpoint-*`` dirs, for ``local``. (templated)
    :param ssh_conn_id: the Airflow SSH connection of the training box, for ``ssh``.
    :param remote_dir: the directory on the box holding ``checkpoint-*`` dirs, for ``ssh``. (templated)
    :param checkpoint_glob: which directories count as checkpoints.
    :param adapter_version: a checkpoint name; empty for the newest. (templated)
    :param force: fetch again even if the same files are already stored. (templated)

    Returns ``{"version", "time", "path", "key", "sha256", "bytes", "files": [{"name", "bytes", "sha256"}],
    "reused"}``.
    """

    template_fields: Sequence[str] = ("artifact_root", "source_path", "remote_dir", "adapter_version", "force")
    ui_color = "#e3f2fd"

    def __init__(
        self,
        *,
        model: str,
        artifact_root: str,
        source_kind: str = "ssh",
        source_path: str | None = None,
        ssh_conn_id: str | None = None,
        remote_dir: str | None = None,
        checkpoint_glob: str = "checkpoint-*",
        adapter_version: str | None = None,
        force: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.source_kind = source_kind
        self.source_path = source_path
        self.ssh_conn_id = ssh_conn_id
        self.remote_dir = remote_dir
        self.checkpoint_glob = checkpoint_glob
        self.adapter_version = adapter_version
        self.force = force

    def execute(self, context: Context) -> dict[str, Any]:
        """Select, fetch and verify the checkpoint; return its record."""
        store = ArtifactStore(self.artifact_root)
        version = self.adapter_version or None
        with engine_errors(self.model):
            if self.source_kind == "local":
                source = LocalSource(Path(str(self.source_path)), self.checkpoint_glob)
                return download_adapter(source, store, self.model, version=version, force=bool(self.force))
            from airflow.providers.ssh.hooks.ssh import SSHHook

            with SSHHook(ssh_conn_id=self.ssh_conn_id).get_conn() as client:
                remote = SSHSource(client, str(self.remote_dir), self.checkpoint_glob,
                                   description=f"{self.ssh_conn_id}:{self.remote_dir}")
                try:
                    return download_adapter(remote, store, self.model, version=version, force=bool(self.force))
                finally:
                    remote.close()
