"""HFSpaceRuntimeSensor (task ``space_ready``): wait until the model's Hugging Face Space runs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout, AirflowSkipException

from operators.links.huggingface import HFSpaceLink
from operators.triggers.hf_space import ERROR_STAGES


class HFSpaceRuntimeSensor(BaseSensorOperator):
    """Poke ``GET /api/spaces/<id>/runtime`` until the stage is RUNNING.

    Fails at once (no retries) on BUILD_ERROR / RUNTIME_ERROR / CONFIG_ERROR with the stage's error message,
    and on a timeout. Skips when ``settings`` is None, the publish record has no ``space_id``, or ``main``
    did not move (a backfill or a no-op leaves the Space alone). Waits ``space_timeout_s`` polling every
    ``space_poke_interval_s`` (poke, or reschedule when the interval is 60 s or more); with ``deferrable``
    (argument or ``settings["deferrable"]``) the wait runs in the triggerer
    (:class:`~operators.triggers.hf_space.HFSpaceRuntimeTrigger`).

    :param model: the model's name in config/models.yaml.
    :param published: the publish task's record (``space_id``, ``space_url``, ``main_moved``). (templated)
    :param settings: the model's ``hf`` config as a dict, or None (skip).
    :param deferrable: wait in the triggerer instead of a worker slot.

    Returns ``{"space_id", "stage", "url", "waited_s"}``.
    """

    template_fields: Sequence[str] = ("published",)
    operator_extra_links = (HFSpaceLink(),)
    ui_color = "#fff8e1"

    def __init__(self, *, model: str, published: Any, settings: dict[str, Any] | None, deferrable: bool = False,
                 **kwargs: Any) -> None:
        s = dict(settings or {})
        interval = float(s.get("space_poke_interval_s", 30))
        kwargs.setdefault("poke_interval", interval)
        kwargs.setdefault("timeout", float(s.get("space_timeout_s", 1800)))
        kwargs.setdefault("mode", "reschedule" if interval >= 60 else "poke")
        super().__init__(**kwargs)
        self.model = model
        self.published = published
        self.settings = s if settings else None
        self.deferrable = bool(deferrable or s.get("deferrable", False))
        self._started = time.monotonic()
        self._last: tuple[str | None, str | None] = (None, None)

    def execute(self, context: Context) -> Any:
        """Skip, defer, or poke; a timeout fails with the last stage seen."""
        space_id = self._space_id()
        self._started = time.monotonic()
        if self.deferrable:
            from operators.triggers.hf_space import HFSpaceRuntimeTrigger

            self.log.info("deferring the wait for Space %s to the triggerer (up to %.0f s)", space_id, self.timeout)
            self.defer(trigger=HFSpaceRuntimeTrigger(
                space_id=space_id, conn_id=self._conn_id(), endpoint=self._endpoint(),
                timeout_s=float(self.timeout), poke_interval_s=float(self.poke_interval)),
                method_name="execute_complete", timeout=timedelta(seconds=float(self.timeout) + 60))
        try:
            return super().execute(context)
        except AirflowSensorTimeout as err:
            raise AirflowFailException(self._timeout_message()) from err

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """One runtime read: done on RUNNING, fail on an error stage, else poke again."""
        from include.hub.retry import HubCaller
        from include.hub.space import space_stage
        from operators.common import engine_errors
        from operators.operators.hf_space import hub_credentials

        space_id = self._space_id()
        with engine_errors(self.model):
            token, endpoint = hub_credentials(self._conn_id())
            from huggingface_hub import HfApi

            api = HfApi(endpoint=self._endpoint() or endpoint, token=token, library_name="lora-deploy")
            call = HubCaller(self.model, secrets=(token,), max_retries=int(self.settings.get("max_retries", 4)),
                             endpoint=endpoint)
            stage, message = call("read the runtime of the Space", space_id, space_stage, api, space_id)
        self._last = (stage, message)
        return self._judge(space_id, stage, message, time.monotonic() - self._started)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: RUNNING passes, an error stage or a timeout fails at once."""
        if not isinstance(event, dict) or "status" not in event:
            raise AirflowFailException(f"model {self.model!r}: unexpected event from HFSpaceRuntimeTrigger: {event!r}")
        space_id = self._space_id()
        self._last = (event.get("stage"), event.get("message"))
        if event["status"] == "timeout":
            raise AirflowFailException(self._timeout_message())
        result = self._judge(space_id, event.get("stage"), event.get("message"), float(event.get("waited_s") or 0))
        if isinstance(result, PokeReturnValue):
            return result.xcom_value
        raise AirflowFailException(f"model {self.model!r}: Space {space_id} ended the wait at stage "
                                   f"{event.get('stage')!r}: {event.get('message')}")

    # --- helpers --------------------------------------------------------------------------------------------
    def _judge(self, space_id: str, stage: str | None, message: str | None, waited: float) -> PokeReturnValue | bool:
        if stage == "RUNNING":
            self.log.info("Space %s is RUNNING after %.1f s", space_id, waited)
            return PokeReturnValue(is_done=True, xcom_value={
                "space_id": space_id, "stage": stage, "url": self._url(space_id), "waited_s": round(waited, 3)})
        if stage in ERROR_STAGES or (stage or "").startswith("HTTP "):
            raise AirflowFailException(
                f"model {self.model!r}: Space {space_id} is {stage}: {message or 'no error message'}. Fix: open "
                f"{self._url(space_id)} (Logs tab), fix the app or its variables (MODEL_REPO, MODEL_FILE), then "
                "re-run the publish task")
        self.log.info("Space %s is %s (%.0f s of %.0f s)", space_id, stage, waited, float(self.timeout))
        return False

    def _space_id(self) -> str:
        if not self.settings:
            raise AirflowSkipException(f"model {self.model!r} has no `hf` section: no Space to wait for")
        published = self.published if isinstance(self.published, dict) else {}
        if not published.get("space_id"):
            raise AirflowSkipException(f"model {self.model!r} has no Space: nothing to wait for")
        if not published.get("main_moved"):
            raise AirflowSkipException(f"model {self.model!r}: main did not move (backfill or no-op): the Space "
                                       "was not changed")
        return str(published["space_id"])

    def _conn_id(self) -> str:
        return str((self.settings or {}).get("conn_id") or "huggingface_default")

    def _endpoint(self) -> str | None:
        """The endpoint from the publish record's URL (so the sensor asks the Hub the task published to)."""
        published = self.published if isinstance(self.published, dict) else {}
        url = str(published.get("space_url") or "")
        return url.split("/spaces/")[0] if "/spaces/" in url else None

    def _url(self, space_id: str) -> str:
        published = self.published if isinstance(self.published, dict) else {}
        return str(published.get("space_url") or f"https://huggingface.co/spaces/{space_id}")

    def _timeout_message(self) -> str:
        stage, message = self._last
        return (f"model {self.model!r}: Space {self._space_id()} did not reach RUNNING within {self.timeout:.0f} s "
                f"(last stage {stage!r}{': ' + message if message else ''}). Fix: raise hf.space_timeout_s for slow "
                "builds, or check the Space's build logs")
