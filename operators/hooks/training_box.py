"""Opening a model's adapter source (local dir, SSH box, Vast.ai instance) from Airflow connections.

Shared by the plan task (which only lists checkpoints) and the download task (which fetches one), so
both see the same box the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from include.errors import SourceError
from include.source.endpoint import SSHEndpoint, connect
from include.source.local import LocalSource
from include.source.ssh import SSHSource
from include.source.types import AdapterSource
from include.source.vastai import VastAIClient, resolve_api_key, resolve_base_url

log = logging.getLogger(__name__)

SOURCE_KINDS = ("local", "ssh", "vastai")


@dataclass(frozen=True)
class SourceOpener:
    """Everything needed to reach a model's checkpoints; ``open()`` yields the connected source."""

    kind: str
    path: str | None = None
    ssh_conn_id: str | None = None
    remote_dir: str | None = None
    checkpoint_glob: str = "checkpoint-*"
    instance_id: str | None = None
    vastai_conn_id: str = "vastai_default"
    api_url: str | None = None
    transfer: str = "auto"
    verify_host_key: bool = True

    @classmethod
    def from_config(cls, source: dict[str, Any], *, instance_id: str | None = None) -> SourceOpener:
        """From a model's ``source`` config (``ModelConfig.source.model_dump()``), with an optional instance id."""
        fields = {k: v for k, v in source.items() if k in cls.__dataclass_fields__ and v is not None}
        if instance_id:
            fields["instance_id"] = str(instance_id)
        return cls(**fields)

    @contextmanager
    def open(self) -> Iterator[AdapterSource]:
        """The connected source; closes its SSH session on exit."""
        if self.kind not in SOURCE_KINDS:
            raise SourceError(f"source kind {self.kind!r} is not one of {SOURCE_KINDS}", fix="correct source.kind")
        if self.kind == "local":
            yield LocalSource(Path(str(self.path)), self.checkpoint_glob)
            return
        endpoint, where = self.endpoint()
        client = connect(endpoint)
        try:
            remote = SSHSource(client, str(self.remote_dir), self.checkpoint_glob,
                               description=f"{where}:{self.remote_dir}", endpoint=endpoint,
                               method=self.transfer)  # type: ignore[arg-type]
            try:
                yield remote
            finally:
                remote.close()
        finally:
            client.close()

    def endpoint(self) -> tuple[SSHEndpoint, str]:
        """How to reach the box (from the SSH connection, and for Vast.ai the instance's endpoint); no secret logged."""
        extras: dict[str, Any] = {}
        host, port, login = None, None, None
        if self.ssh_conn_id:
            conn = BaseHook.get_connection(self.ssh_conn_id)
            extras, host, port, login = conn.extra_dejson, conn.host, conn.port, conn.login
        where = self.ssh_conn_id or ""
        if self.kind == "vastai":
            instance = self.vast_client().running_instance(str(self.instance_id))
            host, port = instance.ssh_host, instance.ssh_port
            where = f"vast.ai instance {instance.id}"
            log.info("%s is running; SSH at %s:%d (%s)", where, host, port, "direct" if instance.direct else "proxy")
        if not host:
            raise SourceError(f"connection {self.ssh_conn_id!r} has no host", fix="set the host of the SSH connection")
        if str(extras.get("no_host_key_check", "")).lower() == "true" and self.verify_host_key:
            log.warning("connection %r says no_host_key_check, but host keys are still checked: set "
                        "verify_host_key: false in the model's source config to skip the check", self.ssh_conn_id)
        endpoint = SSHEndpoint(host=host, port=int(port or 22), user=login or "root", key_file=extras.get("key_file"),
                               private_key=extras.get("private_key"), host_key=extras.get("host_key"),
                               verify_host_key=bool(self.verify_host_key))
        return endpoint, where

    def vast_client(self) -> VastAIClient:
        """A Vast.ai client with the key from ``vastai_conn_id`` (or ``$VAST_API_KEY``)."""
        from airflow.sdk.exceptions import AirflowNotFoundException

        password, host = None, None
        try:
            conn = BaseHook.get_connection(self.vastai_conn_id)
            password, host = conn.password, conn.host
        except AirflowNotFoundException:
            log.info("no connection %r: using VAST_API_KEY", self.vastai_conn_id)
        return VastAIClient(resolve_api_key(password), resolve_base_url(self.api_url, host))
