"""VastAIDownloadOperator: fetch one adapter checkpoint from the training box into the artifact store.

:class:`CheckpointSourceMixin` is what the plan and download tasks share: the model's ``source`` section and the
hooks that reach it, so both see the same box the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from include.config.sections import LocalSource as LocalSettings
from include.config.sections import SSHSource as SSHSettings
from include.config.sections import VastAISource as VastAISettings
from include.source.download import download_adapter
from include.source.local import LocalSource
from include.source.types import AdapterSource
from include.store.artifacts import ArtifactStore
from operators.common import SourceSettings, as_bool, engine_errors, source_section
from operators.hooks.training_box import TrainingBoxHook
from operators.hooks.vastai import VastAIHook

log = logging.getLogger(__name__)

# Runs that stand for a point in time: they take the newest checkpoint that existed at their data interval end.
DATED_RUN_TYPES = ("scheduled", "backfill")


class CheckpointSourceMixin:
    """The model's checkpoint source for an operator: :meth:`source_settings` (the validated ``source`` section,
    after rendering), the hooks that reach it, and :meth:`open_source`."""

    model: str

    def source_settings(self) -> SourceSettings:
        """The ``source`` section this task reads (from its rendered arguments)."""
        raise NotImplementedError

    @cached_property
    def vastai_hook(self) -> VastAIHook:
        """The Vast.ai API of the source (``source.vastai_conn_id``, ``source.api_url``)."""
        source = self.source_settings()
        if not isinstance(source, VastAISettings):
            return VastAIHook()
        return VastAIHook(source.vastai_conn_id, api_url=source.api_url)

    @cached_property
    def hook(self) -> TrainingBoxHook:
        """SSH to the box (for Vast.ai: the running instance's endpoint with the SSH connection's keys)."""
        source = self.source_settings()
        if isinstance(source, LocalSettings):
            raise TypeError(f"model {self.model!r}: a local source has no SSH hook")
        instance = source.instance_id if isinstance(source, VastAISettings) else None
        return TrainingBoxHook(source.ssh_conn_id, verify_host_key=source.verify_host_key,
                               vastai=self.vastai_hook if instance else None, instance_id=instance)

    @contextmanager
    def open_source(self) -> Iterator[AdapterSource]:
        """The engine's source of checkpoints (a local directory or the box over SSH), closed on exit."""
        source = self.source_settings()
        if isinstance(source, LocalSettings):
            yield LocalSource(Path(source.path), source.checkpoint_glob)
            return
        with self.hook.open_source(source.remote_dir, source.checkpoint_glob, source.transfer) as remote:
            yield remote


class VastAIDownloadOperator(CheckpointSourceMixin, BaseOperator):
    """Download an adapter checkpoint from a Vast.ai instance, any SSH box or a local directory.

    Which checkpoint: the one named in ``adapter_version``; else, for scheduled and backfill runs, the
    newest one not newer than the run's ``data_interval_end``; else the newest. Files are sha256-hashed on
    the box, transferred with resume (rsync ``--partial --append-verify`` or SFTP), verified and moved
    into the artifact store; files already stored with the same hash are not fetched again.

    The arguments are the fields of the model's ``source`` section (validated by it at run time; an argument
    left out takes the section's default). The box is reached through :class:`TrainingBoxHook` (``hook``).

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
    :param selected_by: how ``adapter_version`` was chosen when another task chose it (the plan's ``selected_by``:
        ``newest``, ``data_interval_end``, ``asset event``, ``conf``); empty: ``conf`` for a given version. (templated)
    :param force: fetch again even if the same files are already stored. (templated)

    Returns ``{"version", "time", "selected_by", "path", "key", "sha256", "bytes",
    "files": [{"name", "bytes", "sha256"}], "transfer": {"method", "received_bytes", "resumed_bytes",
    "seconds"} | None, "reused"}``.
    """

    template_fields: Sequence[str] = ("artifact_root", "instance_id", "source_path", "remote_dir", "adapter_version",
                                      "selected_by", "force")
    ui_color = "#e3f2fd"

    def __init__(
        self,
        *,
        model: str,
        artifact_root: str,
        source_kind: str = "ssh",
        instance_id: str | int | None = None,
        vastai_conn_id: str | None = None,
        vastai_api_url: str | None = None,
        source_path: str | None = None,
        ssh_conn_id: str | None = None,
        remote_dir: str | None = None,
        checkpoint_glob: str | None = None,
        transfer: str | None = None,
        verify_host_key: bool | None = None,
        adapter_version: str | None = None,
        selected_by: str | None = None,
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
        self.selected_by = selected_by
        self.force = force

    def execute(self, context: Context) -> dict[str, Any]:
        """Select, fetch and verify the checkpoint; return its record."""
        store = ArtifactStore(self.artifact_root)
        version = str(self.adapter_version).strip() or None if self.adapter_version else None
        not_after = None if version else self.dated_selection(context)
        force = as_bool(self.force)
        with engine_errors(self.model), self.open_source() as source:
            return download_adapter(source, store, self.model, version=version, not_after=not_after, force=force,
                                    selected_by=str(self.selected_by or "").strip() or None)

    def source_settings(self) -> SourceSettings:
        """The ``source`` section of this operator's (rendered) arguments; what is left out takes its default."""
        fields = {"kind": self.source_kind, "path": self.source_path, "ssh_conn_id": self.ssh_conn_id,
                  "remote_dir": self.remote_dir, "checkpoint_glob": self.checkpoint_glob,
                  "instance_id": self.instance_id, "vastai_conn_id": self.vastai_conn_id,
                  "api_url": self.vastai_api_url, "transfer": self.transfer, "verify_host_key": self.verify_host_key}
        kinds = {"local": LocalSettings, "ssh": SSHSettings, "vastai": VastAISettings}
        known = kinds[self.source_kind].model_fields if self.source_kind in kinds else fields
        return source_section({k: v for k, v in fields.items() if k in known and v is not None and v != ""},
                              model=self.model)

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
