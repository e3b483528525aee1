"""VastAIDownloadOperator: fetch one adapter checkpoint from the training box into the artifact store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.source.download import download_adapter
from include.store.artifacts import ArtifactStore
from operators.common import as_bool, engine_errors
from operators.hooks.training_box import SourceOpener

log = logging.getLogger(__name__)

# Runs that stand for a point in time: they take the newest checkpoint that existed at their data interval end.
DATED_RUN_TYPES = ("scheduled", "backfill")


class VastAIDownloadOperator(BaseOperator):
    """Download an adapter checkpoint from a Vast.ai instance, any SSH box or a local directory.

    Which checkpoint: the one named in ``adapter_version``; else, for scheduled and backfill runs, the
    newest one not newer than the run's ``data_interval_end``; else the newest. Files are sha256-hashed on
    the box, transferred with resume (rsync ``--partial --append-verify`` or SFTP), verified and moved
    into the artifact store; files already stored with the same hash are not fetched again.

    :param model: the model's name in config/models.yaml.
    :param artifact_root: root of the artifact store. (templated)
    :param source_kind: ``"vastai"`` (instance id -> SSH endpoint through the Vast.ai API), ``"ssh"`` (an SSH
        connection) or ``"local"`` (a directory here).
    :param instance_id: the Vast.ai instance id, for ``vastai``. (templated)
    :param vastai_conn_id: connection whose password is the Vast.ai API key (``$VAST_API_KEY`` otherwise) and
        whose host, if set, overrides the API URL.
    :param vastai_api_url: the API base URL (default: the connection's host, ``$VAST_URL``, console.vast.ai).
    :param source_path: the local directory holding ``checkpoint-*`` dirs, for ``local``. (templated)
    :param ssh_conn_id: the SSH connection of the box (login, ``key_file`` or ``private_key``, ``host_key``);
        for ``vastai`` its host and port are replaced by the instance's.
    :param remote_dir: the directory on the box holding ``checkpoint-*`` dirs. (templated)
    :param checkpoint_glob: which directories count as checkpoints.
    :param transfer: ``auto`` (rsync when both ends have it, else SFTP), ``rsync`` or ``sftp``.
    :param verify_host_key: check the box's host key (pinned ``host_key`` or known_hosts); False skips it.
    :param adapter_version: a checkpoint name; empty to select by date or newest. (templated)
    :param force: fetch again even if the same files are already stored. (templated)

    Returns ``{"version", "time", "selected_by", "path", "key", "sha256", "bytes",
    "files": [{"name", "bytes", "sha256"}], "transfer": {"method", "received_bytes", "resumed_bytes",
    "seconds"} | None, "reused"}``.
    """

    template_fields: Sequence[str] = ("artifact_root", "instance_id", "source_path", "remote_dir", "adapter_version",
                                      "force")
    ui_color = "#e3f2fd"

    def __init__(
        self,
        *,
        model: str,
        artifact_root: str,
        source_kind: str = "ssh",
        instance_id: str | int | None = None,
        vastai_conn_id: str = "vastai_default",
        vastai_api_url: str | None = None,
        source_path: str | None = None,
        ssh_conn_id: str | None = None,
        remote_dir: str | None = None,
        checkpoint_glob: str = "checkpoint-*",
        transfer: str = "auto",
        verify_host_key: bool = True,
        adapter_version: str | None = None,
        force: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.source_kind = source_kind
        self.instance_id = instance_id
        self.vastai_conn_id = vastai_conn_id
        self.vastai_api_url = vastai_api_url
        self.source_path = source_path
        self.ssh_conn_id = ssh_conn_id
        self.remote_dir = remote_dir
        self.checkpoint_glob = checkpoint_glob
        self.transfer = transfer
        self.verify_host_key = verify_host_key
        self.adapter_version = adapter_version
        self.force = force

    def execute(self, context: Context) -> dict[str, Any]:
        """Select, fetch and verify the checkpoint; return its record."""
        store = ArtifactStore(self.artifact_root)
        version = str(self.adapter_version).strip() or None if self.adapter_version else None
        not_after = None if version else self.dated_selection(context)
        force = as_bool(self.force)
        with engine_errors(self.model), self.opener().open() as source:
            return download_adapter(source, store, self.model, version=version, not_after=not_after, force=force)

    def opener(self) -> SourceOpener:
        """The source this operator reads, from its (rendered) arguments."""
        return SourceOpener(kind=self.source_kind, path=self.source_path, ssh_conn_id=self.ssh_conn_id,
                            remote_dir=self.remote_dir, checkpoint_glob=self.checkpoint_glob,
                            instance_id=None if self.instance_id is None else str(self.instance_id),
                            vastai_conn_id=self.vastai_conn_id, api_url=self.vastai_api_url,
                            transfer=self.transfer, verify_host_key=bool(self.verify_host_key))

    @staticmethod
    def dated_selection(context: Context) -> datetime | None:
        """The run's data_interval_end for scheduled and backfill runs (they select by date), else None."""
        return dated_selection(context)


def dated_selection(context: Context) -> datetime | None:
    """The run's data_interval_end for scheduled and backfill runs (they select by date), else None."""
    dag_run = context.get("dag_run")
    run_type = getattr(getattr(dag_run, "run_type", None), "value", getattr(dag_run, "run_type", None))
    if str(run_type) not in DATED_RUN_TYPES:
        return None
    end = context.get("data_interval_end") or getattr(dag_run, "data_interval_end", None)
    if end is not None:
        log.info("%s run: taking the newest checkpoint not newer than %s", run_type, end)
    return end
