"""HFSpaceRuntimeTrigger: wait in the triggerer until a Hugging Face Space runs, fails, or the wait times out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

ERROR_STAGES = ("BUILD_ERROR", "RUNTIME_ERROR", "CONFIG_ERROR")


class HFSpaceRuntimeTrigger(BaseTrigger):
    """Poll ``GET /api/spaces/<id>/runtime`` until the stage is RUNNING, an error stage, or ``timeout_s``.

    The token is NOT among the kwargs (they are stored in the metadata database): ``run()`` builds a
    :class:`~operators.hooks.huggingface.HuggingFaceHook` from ``conn_id`` and reads the token in the triggerer
    (``aget_connection``; or HF_TOKEN in the triggerer's environment).
    A missing token, HTTP 401/403/404 or an error stage end the wait at once. Yields one event
    ``{"status": "running"|"error"|"timeout", "stage", "message", "polls", "waited_s"}``.
    """

    def __init__(self, *, space_id: str, conn_id: str, endpoint: str | None, timeout_s: float,
                 poke_interval_s: float) -> None:
        super().__init__()
        self.kwargs = {"space_id": space_id, "conn_id": conn_id, "endpoint": endpoint, "timeout_s": float(timeout_s),
                       "poke_interval_s": float(poke_interval_s)}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The classpath and the JSON-safe kwargs the triggerer rebuilds this trigger from (no token)."""
        return f"{type(self).__module__}.{type(self).__qualname__}", dict(self.kwargs)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until a final stage or the deadline; yield one event."""
        import httpx

        from include.errors import PublishError
        from operators.hooks.huggingface import HuggingFaceHook

        k = self.kwargs
        try:
            credentials = await HuggingFaceHook(k["conn_id"]).aget_credentials()
        except PublishError as err:
            yield TriggerEvent({"status": "error", "stage": None, "message": str(err), "polls": 0, "waited_s": 0.0})
            return
        endpoint = k["endpoint"] or credentials.endpoint or "https://huggingface.co"
        url = f"{endpoint.rstrip('/')}/api/spaces/{k['space_id']}/runtime"
        headers = {"Authorization": f"Bearer {credentials.token}"}
        started = time.monotonic()
        polls, stage, message, status = 0, None, None, "timeout"
        async with httpx.AsyncClient(trust_env=False, headers=headers) as client:
            while True:
                polls += 1
                try:
                    response = await client.get(url, timeout=30)
                    if response.status_code in (401, 403, 404):
                        status, stage = "error", f"HTTP {response.status_code}"
                        message = response.headers.get("X-Error-Message") or response.text[:300]
                        break
                    response.raise_for_status()
                    runtime = response.json()
                    stage, message = runtime.get("stage"), runtime.get("errorMessage")
                except (httpx.HTTPError, ValueError) as err:
                    message = f"{type(err).__name__}: {err}"
                if stage == "RUNNING":
                    status = "running"
                    break
                if stage in ERROR_STAGES:
                    status = "error"
                    break
                if time.monotonic() + k["poke_interval_s"] > started + k["timeout_s"]:
                    break
                self.log.info("Space %s is %s (poll %d)", k["space_id"], stage, polls)
                await asyncio.sleep(k["poke_interval_s"])
        yield TriggerEvent({"status": status, "stage": stage, "message": message, "polls": polls,
                            "waited_s": round(time.monotonic() - started, 3)})
