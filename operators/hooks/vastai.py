"""VastAIHook: the Vast.ai API key and URL from an Airflow connection, handed to the engine's client."""

from __future__ import annotations

import logging
import os

from airflow.sdk import BaseHook

from include.source.vastai import API_KEY_ENV, VastAIClient, VastInstance, resolve_api_key, resolve_base_url
from operators.hooks.base import ConnectionLookup

log = logging.getLogger(__name__)


class VastAIHook(ConnectionLookup, BaseHook):
    """The Vast.ai REST API of one account.

    The connection ``vastai_conn_id`` (type generic) holds the API key as its password and, optionally,
    another API base URL as its host. Without the connection, ``$VAST_API_KEY`` (and ``$VAST_URL``) stand in.
    The key reaches only the engine's :class:`~include.source.vastai.VastAIClient`; it is never logged.

    :param vastai_conn_id: the connection id (``source.vastai_conn_id``).
    :param api_url: an API base URL that wins over the connection's host (``source.api_url``).
    """

    conn_name_attr = "vastai_conn_id"
    default_conn_name = "vastai_default"
    conn_type = "generic"
    hook_name = "Vast.ai"

    def __init__(self, vastai_conn_id: str = default_conn_name, *, api_url: str | None = None) -> None:
        super().__init__()
        self.vastai_conn_id = vastai_conn_id
        self.api_url = api_url

    def get_conn(self) -> VastAIClient:
        """A client with the connection's key (or ``$VAST_API_KEY``) and URL; VastAIError when there is no key."""
        conn = self.find_connection(self.vastai_conn_id)
        if conn is None:
            log.info("no connection %r: using %s", self.vastai_conn_id, API_KEY_ENV)
        password, host = (conn.password, conn.host) if conn is not None else (None, None)
        return VastAIClient(resolve_api_key(password), resolve_base_url(self.api_url, host))

    def has_credentials(self) -> bool:
        """True when the connection exists or ``$VAST_API_KEY`` can stand in for it (checked by the plan task)."""
        return bool(os.environ.get(API_KEY_ENV)) or self.connection_exists(self.vastai_conn_id)

    def running_instance(self, instance_id: str) -> VastInstance:
        """The instance, which must be running (VastAIError otherwise), with the SSH endpoint to reach it."""
        instance = self.get_conn().running_instance(instance_id)
        log.info("vast.ai instance %s is running; SSH at %s:%d (%s)", instance.id, instance.ssh_host,
                 instance.ssh_port, "direct" if instance.direct else "proxy")
        return instance
