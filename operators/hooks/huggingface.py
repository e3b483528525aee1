"""HuggingFaceHook: the Hub token and endpoint from an Airflow connection (sync for tasks, async for triggers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from include.errors import PublishError
from operators.hooks.base import ConnectionLookup

if TYPE_CHECKING:
    from huggingface_hub import HfApi

TOKEN_ENV = "HF_TOKEN"
ENDPOINT_ENV = "HF_ENDPOINT"


@dataclass(frozen=True)
class HubCredentials:
    """A token and the Hub it is for (None: huggingface.co); the token is left out of ``repr``."""

    token: str = field(repr=False)
    endpoint: str | None = None


class HuggingFaceHook(ConnectionLookup, BaseHook):
    """The Hugging Face Hub as one account sees it.

    The connection ``hf_conn_id`` (type generic) holds a token as its password and, optionally, another Hub
    endpoint as its host (``https://hub.example`` or a bare host name, with ``schema``/``port`` when needed).
    Without a password, ``$HF_TOKEN`` stands in (and ``$HF_ENDPOINT`` for the endpoint). No token at all is a
    :class:`~include.errors.PublishError` naming the connection and the fix. The token never reaches a log.

    :param hf_conn_id: the connection id (``hf.conn_id``).
    """

    conn_name_attr = "hf_conn_id"
    default_conn_name = "huggingface_default"
    conn_type = "generic"
    hook_name = "Hugging Face Hub"

    def __init__(self, hf_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.hf_conn_id = hf_conn_id

    def get_credentials(self) -> HubCredentials:
        """The token and endpoint, from the connection or the environment."""
        return self.credentials_from(self.find_connection(self.hf_conn_id))

    async def aget_credentials(self) -> HubCredentials:
        """:meth:`get_credentials` for triggers (``aget_connection``)."""
        return self.credentials_from(await self.afind_connection(self.hf_conn_id))

    def get_conn(self, endpoint: str | None = None) -> HfApi:
        """An ``HfApi`` client; ``endpoint`` (e.g. the one a record was published to) wins over the connection's."""
        from huggingface_hub import HfApi

        credentials = self.get_credentials()
        return HfApi(endpoint=endpoint or credentials.endpoint, token=credentials.token, library_name="lora-deploy")

    def has_credentials(self) -> bool:
        """True when the connection exists or ``$HF_TOKEN`` can stand in for it (checked by the plan task)."""
        return bool(os.environ.get(TOKEN_ENV)) or self.connection_exists(self.hf_conn_id)

    def credentials_from(self, conn: Any) -> HubCredentials:
        """The credentials a connection (or None: the environment) gives; PublishError without a token."""
        token = (conn.password if conn is not None else None) or os.environ.get(TOKEN_ENV)
        if not token:
            raise PublishError(f"no Hugging Face token: connection {self.hf_conn_id!r} has no password and "
                               f"{TOKEN_ENV} is unset",
                               fix=f"create the connection {self.hf_conn_id!r} with a 'write' token as password, or "
                                   f"set {TOKEN_ENV}")
        endpoint = None
        if conn is not None and conn.host:
            endpoint = conn.host if "://" in conn.host else f"{conn.schema or 'https'}://{conn.host}"
            endpoint += f":{conn.port}" if conn.port else ""
        return HubCredentials(token=token, endpoint=endpoint or os.environ.get(ENDPOINT_ENV))
