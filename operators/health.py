"""HealthCheckSensor: smoke-test the installed GGUF through an ephemeral llama.cpp server, then the live endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue

from include.errors import HealthError
from operators._engine import engine_errors


class HealthCheckSensor(BaseSensorOperator):
    """Pass when the deployed model answers.

    First poke: start ``llama_cpp.server`` on a free loopback port with the installed file of ``quant`` (default
    the first installed), require it to list the model and complete ``prompt`` within ``max_latency_s`` at
    ``min_tokens_per_s`` or faster. Then, when ``live_endpoint`` is set (LM Studio's server), poke it until it
    lists the model and answers, or the sensor times out.

    :param model: the model's name in config/models.yaml.
    :param installed: the LM Studio stage's record. (templated)
    :param live_endpoint: base URL of the live OpenAI-compatible server, or None. (templated)
    :param prompt: the test prompt. (templated)

    Returns the health report: ``{"ok", "smoke": {...}, "live": {...} | None, "latency_s", "tokens_per_s"}``.
    """

    template_fields: Sequence[str] = ("installed", "live_endpoint", "prompt")
    ui_color = "#fce4ec"

    def __init__(
        self,
        *,
        model: str,
        installed: Any,
        prompt: str = "Say hello.",
        max_tokens: int = 16,
        startup_timeout_s: float = 120,
        max_latency_s: float = 60,
        min_tokens_per_s: float = 0,
        live_endpoint: str | None = None,
        quant: str | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", 10)
        kwargs.setdefault("timeout", 900)
        kwargs.setdefault("mode", "poke")
        super().__init__(**kwargs)
        self.model = model
        self.installed = installed
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.startup_timeout_s = startup_timeout_s
        self.max_latency_s = max_latency_s
        self.min_tokens_per_s = min_tokens_per_s
        self.live_endpoint = live_endpoint
        self.quant = quant
        self._smoke: dict[str, Any] | None = None

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """Smoke test once, then the live endpoint until it answers."""
        from include.health import check_endpoint, smoke_test

        with engine_errors(self.model):
            target = self._target()
            if self._smoke is None:
                self._smoke = smoke_test(Path(target["path"]), model_id=target["identifier"], prompt=self.prompt,
                                         max_tokens=self.max_tokens, startup_timeout_s=self.startup_timeout_s)
                self._check_thresholds(self._smoke, "smoke test")
            live = None
            if self.live_endpoint:
                try:
                    live = check_endpoint(self.live_endpoint, model_id=target["identifier"], prompt=self.prompt,
                                          max_tokens=self.max_tokens)
                except HealthError as err:
                    self.log.info("live endpoint not healthy yet: %s", err)
                    return False
                self._check_thresholds(live, "live endpoint")
        measured = live or self._smoke
        report = {"ok": True, "quant": target["quant"], "identifier": target["identifier"], "smoke": self._smoke,
                  "live": live, "latency_s": measured["latency_s"], "tokens_per_s": measured["tokens_per_s"]}
        self.log.info("healthy: %.2f s latency, %.1f tokens/s", report["latency_s"], report["tokens_per_s"])
        return PokeReturnValue(is_done=True, xcom_value=report)

    def _target(self) -> dict[str, Any]:
        installed = self.installed["installed"]
        if self.quant is None:
            return installed[0]
        for item in installed:
            if item["quant"] == self.quant:
                return item
        raise HealthError(f"health.quant {self.quant!r} was not installed; installed: "
                          f"{[i['quant'] for i in installed]}", fix="pick one of the installed quant types")

    def _check_thresholds(self, report: dict[str, Any], what: str) -> None:
        if report["latency_s"] > self.max_latency_s:
            raise HealthError(f"{what}: latency {report['latency_s']:.2f} s exceeds max_latency_s "
                              f"{self.max_latency_s}", fix="raise health.max_latency_s or use a smaller quant")
        if report["tokens_per_s"] < self.min_tokens_per_s:
            raise HealthError(f"{what}: {report['tokens_per_s']:.1f} tokens/s is below min_tokens_per_s "
                              f"{self.min_tokens_per_s}", fix="lower health.min_tokens_per_s or use a smaller quant")
