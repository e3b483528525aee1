"""What every lora-deploy hook shares: asking whether a connection exists without failing."""

from __future__ import annotations

from typing import Any


class ConnectionLookup:
    """Mixin for hooks: :meth:`connection_exists` (a missing connection is an answer, not an error)."""

    @classmethod
    def connection_exists(cls, conn_id: str) -> bool:
        """True when Airflow knows ``conn_id`` (environment variable, secrets backend or metadata DB)."""
        return cls.find_connection(conn_id) is not None

    @classmethod
    def find_connection(cls, conn_id: str) -> Any:
        """The connection ``conn_id``, or None when Airflow knows no such connection."""
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            return None

    @classmethod
    async def afind_connection(cls, conn_id: str) -> Any:
        """:meth:`find_connection` for triggers (the triggerer's event loop must not block)."""
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            return await BaseHook.aget_connection(conn_id)
        except AirflowNotFoundException:
            return None
