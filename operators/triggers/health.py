"""LiveEndpointTrigger: wait in the triggerer until LM Studio serves the model healthily, or time out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class LiveEndpointTrigger(BaseTrigger):
    """Poll ``GET /v1/models`` and ``POST /v1/chat/completions`` with httpx until the checks pass or ``timeout_s``.

    Yields exactly one event: ``{"ok": True|False, "figures": {...}|None, "checks": [...], "error": str|None,
    "attempts": n, "waited_s": s}``. All constructor arguments are JSON-safe (see :meth:`serialize`).
    """

    def __init__(self, *, base_url: str, model_id: str, system_prompt: str, prompt: str, max_tokens: int,
                 max_latency_s: float, min_tokens_per_s: float, min_answer_tokens: int, timeout_s: float,
                 poke_interval_s: float) -> None:
        super().__init__()
        self.kwargs = {"base_url": base_url, "model_id": model_id, "system_prompt": system_prompt, "prompt": prompt,
                       "max_tokens": int(max_tokens), "max_latency_s": float(max_latency_s),
                       "min_tokens_per_s": float(min_tokens_per_s), "min_answer_tokens": int(min_answer_tokens),
                       "timeout_s": float(timeout_s), "poke_interval_s": float(poke_interval_s)}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The classpath and the JSON-safe kwargs the triggerer rebuilds this trigger from."""
        return f"{type(self).__module__}.{type(self).__qualname__}", dict(self.kwargs)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until healthy or the deadline; yield one event."""
        import httpx

        from include.health.endpoint import chat_body, chat_report, evaluate, served_ids

        k = self.kwargs
        base = k["base_url"].rstrip("/")
        started = time.monotonic()
        deadline = started + k["timeout_s"]
        attempts, figures, checks, error = 0, None, [], None
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                attempts += 1
                left = max(deadline - time.monotonic(), 0.5)
                try:
                    listing = (await client.get(f"{base}/v1/models", timeout=left)).raise_for_status().json()
                    if k["model_id"] not in served_ids(listing):
                        raise LookupError(f"{k['model_id']!r} is not listed by /v1/models ({served_ids(listing)})")
                    body = chat_body(k["model_id"], system_prompt=k["system_prompt"], prompt=k["prompt"],
                                     max_tokens=k["max_tokens"])
                    sent = time.monotonic()
                    answer = await client.post(f"{base}/v1/chat/completions", json=body,
                                               timeout=max(deadline - sent, 0.5))
                    answer.raise_for_status()
                    figures = chat_report(k["base_url"], k["model_id"], answer.json(), time.monotonic() - sent)
                    checks = evaluate(figures, max_latency_s=k["max_latency_s"],
                                      min_tokens_per_s=k["min_tokens_per_s"], min_answer_tokens=k["min_answer_tokens"])
                    error = "; ".join(c["detail"] for c in checks if not c["ok"]) or None
                except (httpx.HTTPError, LookupError, ValueError) as err:
                    error = f"{type(err).__name__}: {err}"
                if error is None or time.monotonic() + k["poke_interval_s"] > deadline:
                    break
                self.log.info("live endpoint not healthy yet (attempt %d): %s", attempts, error)
                await asyncio.sleep(k["poke_interval_s"])
        yield TriggerEvent({"ok": error is None, "figures": figures, "checks": checks, "error": error,
                            "attempts": attempts, "waited_s": round(time.monotonic() - started, 3)})
