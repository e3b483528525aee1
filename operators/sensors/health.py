"""HealthCheckSensor: the smoke test before promotion and the live LM Studio check after it."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

from include.config.sections import HealthSettings, LMStudioSettings
from operators.common import engine_errors, memory_guard, section, workers_section
from operators.operators.lmstudio import run_id_of


class HealthCheckSensor(BaseSensorOperator):
    """Check the model: ``phase="smoke"`` (task ``smoke``) or ``phase="live"`` (task ``health``).

    smoke: file checks of the installed file of the served quant (size, sha256 against the install record,
    GGUF magic and version), then an ephemeral ``llama_cpp.server`` answers a chat completion with the system
    prompt and test prompt within ``max_latency_s`` at ``min_tokens_per_s``+ with ``min_answer_tokens``+. Once.

    live: only when ``endpoint`` is set and ``promoted["promoted"]`` is true (else it succeeds at once with
    ``{"skipped": reason}``). LM Studio's ``/v1/models`` must list the identifier and the chat must pass the same
    thresholds. Poked (``mode`` poke/reschedule, ``poke_interval_s``) until ``timeout_s``; with ``deferrable``
    the wait runs in the triggerer (:class:`~operators.triggers.health.LiveEndpointTrigger`).

    :param model: the model's name in config/models.yaml.
    :param installed: the install task's record (or the promote record in rollback_<model>). (templated)
    :param phase: ``"smoke"`` or ``"live"``.
    :param settings: the model's ``lmstudio`` and ``health`` sections: ``{"lmstudio": ..., "health": ...}`` (each a
        section or its ``model_dump()``), or both dumps merged into one flat mapping.
    :param artifact_root: where the deployments ledger lives. (templated)
    :param promoted: the promote task's record; live checks run only when it promoted. (templated)
    :param deferrable: wait for the live endpoint in the triggerer (also ``health.deferrable``).
    :param workers: the model's ``workers`` section: the smoke server's memory estimate must fit its budget (see
        :func:`operators.common.memory_guard`; checked when the server is about to start).

    Returns (XCom) and appends to the ledger: ``{"ok", "phase", "version", "checks": [{"name", "ok", "detail"}],
    "latency_s", "tokens_per_s", "answer_excerpt", "disk_free_bytes": {"models_dir", "artifact_root"},
    "mem_available_bytes", "identifier", "quant", "endpoint", "at"}``. Failure: HealthError with the figures.
    """

    template_fields: Sequence[str] = ("installed", "promoted", "artifact_root")
    ui_color = "#fce4ec"

    def __init__(self, *, model: str, installed: Any, phase: Literal["smoke", "live"], settings: Mapping[str, Any],
                 artifact_root: str, promoted: Any = None, deferrable: bool = False, workers: Any = None,
                 **kwargs: Any) -> None:
        if phase not in ("smoke", "live"):
            raise ValueError(f"phase must be 'smoke' or 'live', not {phase!r}")
        lmstudio, health = _sections(settings, model)
        kwargs.setdefault("mode", health.mode if phase == "live" else "poke")
        kwargs.setdefault("poke_interval", health.poke_interval_s)
        kwargs.setdefault("timeout", health.timeout_s)
        super().__init__(**kwargs)
        self.lmstudio = lmstudio
        self.health = health
        self.model = model
        self.installed = installed
        self.phase = phase
        self.artifact_root = artifact_root
        self.promoted = promoted
        self.deferrable = bool(deferrable or self.health.deferrable)
        self.workers = workers_section(workers, model=model)
        self._last: dict[str, Any] | None = None

    # --- the flow -------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> Any:
        """Skip, defer, or poke; turn a sensor timeout into a HealthError with the last figures."""
        skipped = self._skip_reason()
        if skipped:
            self.log.info("live health check skipped: %s", skipped)
            return {"ok": True, "phase": self.phase, "skipped": skipped}
        if self.phase == "live" and self.deferrable:
            from datetime import timedelta

            from operators.triggers.health import LiveEndpointTrigger

            # One check here first: a healthy endpoint (the usual case) needs no triggerer. It also keeps the
            # trigger from firing within seconds of the deferral, where Airflow 3.3.2 can lose a resumed task's
            # result (apache/airflow#72716).
            first = self.poke(context)
            if isinstance(first, PokeReturnValue) and first.is_done:
                return first.xcom_value

            h, endpoint = self.health, str(self.lmstudio.endpoint)
            self.log.info("deferring the live check of %r at %s to the triggerer (up to %.0f s)",
                          self._target()["identifier"], endpoint, self.timeout)
            self.defer(trigger=LiveEndpointTrigger(
                base_url=endpoint, model_id=self._target()["identifier"], system_prompt=h.system_prompt,
                prompt=h.prompt, max_tokens=h.max_tokens, max_latency_s=h.max_latency_s,
                min_tokens_per_s=h.min_tokens_per_s, min_answer_tokens=h.min_answer_tokens,
                timeout_s=float(self.timeout), poke_interval_s=float(self.poke_interval)),
                method_name="execute_complete", timeout=timedelta(seconds=float(self.timeout) + 60))
        try:
            return super().execute(context)
        except AirflowSensorTimeout:
            self._finish(context, self._last or {"error": "never reached the endpoint"}, ok=False)
            raise  # _finish raised already; kept for type checkers

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: validate its event, record the report, pass or fail."""
        if not isinstance(event, dict) or "ok" not in event or "checks" not in event:
            raise AirflowFailException(f"model {self.model!r}: unexpected event from LiveEndpointTrigger: {event!r}")
        self.log.info("triggerer finished after %s attempt(s), %.1f s", event.get("attempts"),
                      event.get("waited_s") or 0)
        measured = {**(event.get("figures") or {}), "checks": event["checks"], "error": event.get("error")}
        return self._finish(context, measured, ok=bool(event["ok"]))

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """smoke: check once (pass or raise). live: one attempt; False (poke again) while not healthy."""
        from include.errors import HealthError
        from include.health.endpoint import check_chat, evaluate
        from include.health.smoke import check_gguf_file, serve_gguf
        from include.plan.stages import smoke_stage

        h, target = self.health, self._target()
        chat = {"system_prompt": h.system_prompt, "prompt": h.prompt, "max_tokens": h.max_tokens}
        limits = {"max_latency_s": h.max_latency_s, "min_tokens_per_s": h.min_tokens_per_s,
                  "min_answer_tokens": h.min_answer_tokens}
        if self.phase == "smoke":
            checks = check_gguf_file(Path(target["path"]), size=target.get("bytes"), sha256=target.get("sha256"))
            self.log.info("file checks: %s", "; ".join(f"{c['name']} {'ok' if c['ok'] else 'FAILED'}: {c['detail']}"
                                                       for c in checks))
            figures: dict[str, Any] = {}
            if all(c["ok"] for c in checks):
                started = time.monotonic()
                try:
                    with engine_errors(self.model), memory_guard(
                            self, context, "smoke", lambda: smoke_stage(Path(target["path"]))), serve_gguf(
                            Path(target["path"]), model_id=target["identifier"],
                            startup_timeout_s=h.startup_timeout_s) as url:
                        figures = check_chat(url, model_id=target["identifier"], **chat)
                        figures["startup_s"] = round(time.monotonic() - started, 3)
                        figures["endpoint"] = "ephemeral llama_cpp.server"
                        checks += evaluate(figures, **limits)
                except HealthError as err:
                    checks.append({"name": "server", "ok": False, "detail": str(err)})
            return PokeReturnValue(is_done=True, xcom_value=self._finish(
                context, {**figures, "checks": checks}, ok=all(c["ok"] for c in checks)))
        try:
            figures = check_chat(str(self.lmstudio.endpoint), model_id=target["identifier"], **chat)
            checks = evaluate(figures, **limits)
        except HealthError as err:
            self._last = {"checks": [{"name": "endpoint", "ok": False, "detail": err.detail}], "error": err.detail}
            self.log.info("live endpoint not healthy yet: %s", err.detail)
            return False
        self._last = {**figures, "checks": checks}
        if all(c["ok"] for c in checks):
            return PokeReturnValue(is_done=True, xcom_value=self._finish(context, self._last, ok=True))
        self.log.info("live endpoint answers but fails: %s", "; ".join(c["detail"] for c in checks if not c["ok"]))
        return False

    # --- helpers --------------------------------------------------------------------------------------------
    def _skip_reason(self) -> str | None:
        if self.phase != "live":
            return None
        if not self.lmstudio.endpoint:
            return "no lmstudio.endpoint configured"
        if not isinstance(self.promoted, dict) or not self.promoted.get("promoted"):
            why = self.promoted.get("reason") if isinstance(self.promoted, dict) else "promote gave no record"
            return f"this run's version was not made current ({why})"
        return None

    def _target(self) -> dict[str, Any]:
        from include.errors import HealthError

        installed = self.installed["installed"]
        quant = self.lmstudio.quant
        for item in installed:
            if quant is None or item["quant"] == quant:
                return item
        raise HealthError(f"lmstudio.quant {quant!r} was not installed; installed: {[i['quant'] for i in installed]}",
                          model=self.model, fix="set lmstudio.quant to one of quantize.types")

    def _finish(self, context: Context, measured: dict[str, Any], *, ok: bool) -> dict[str, Any]:
        """Build the report, append it to the ledger, log the figures; raise when not ok."""
        from include.errors import HealthError
        from include.health.smoke import resources
        from include.lmstudio.deploy import record_health

        target = self._target()
        version = self.installed.get("version")
        report = {"ok": ok, "phase": self.phase, "version": version, "checks": measured.get("checks", []),
                  "latency_s": measured.get("latency_s"), "tokens_per_s": measured.get("tokens_per_s"),
                  "answer_excerpt": measured.get("answer_excerpt"), "identifier": target["identifier"],
                  "quant": target["quant"], "endpoint": measured.get("endpoint", self.lmstudio.endpoint),
                  "at": datetime.now(UTC).isoformat(timespec="seconds"),
                  **resources(self.installed.get("models_dir") or Path(target["path"]).parent, self.artifact_root)}
        failed = [c for c in report["checks"] if not c["ok"]]
        reason = None
        if not ok:
            reason = f"{self.phase} check failed: " + ("; ".join(f"{c['name']}: {c['detail']}" for c in failed)
                                                       or str(measured.get("error") or "timed out"))
        record_health(str(self.artifact_root), self.model, version, report, run_id=run_id_of(context),
                      failure=reason)
        self.log.info("%s health of %s %s (%s): %s; latency %s s, %s tokens/s, answer %r", self.phase, self.model,
                      version, target["quant"], "OK" if ok else "FAILED", report["latency_s"],
                      report["tokens_per_s"], (report["answer_excerpt"] or "")[:80])
        if not ok:
            err = HealthError(reason, model=self.model,
                              fix="see the figures above; check the GGUF, LM Studio's log, or relax health.* limits")
            if self.phase == "live":
                raise AirflowFailException(str(err))
            with engine_errors(self.model):
                raise err
        return report


def _sections(settings: Mapping[str, Any], model: str) -> tuple[LMStudioSettings, HealthSettings]:
    """The ``lmstudio`` and ``health`` sections from ``{"lmstudio": ..., "health": ...}`` or one flat mapping
    (split by field name: the two sections share none; a key of neither is reported by ``health``)."""
    if "lmstudio" in settings or "health" in settings:
        lmstudio, health = settings.get("lmstudio"), settings.get("health")
    else:
        lmstudio = {k: v for k, v in settings.items() if k in LMStudioSettings.model_fields}
        health = {k: v for k, v in settings.items() if k not in LMStudioSettings.model_fields}
    return (section(LMStudioSettings, lmstudio, model=model, name="lmstudio"),
            section(HealthSettings, health, model=model, name="health"))
