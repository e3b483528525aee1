"""HFSpaceRuntimeSensor (task ``space_ready``): wait until the model's Hugging Face Space runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, cast

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout, AirflowSkipException

from include.config.sections import HFSettings
from operators.common import section
from operators.hooks.huggingface import HuggingFaceHook
from operators.links.huggingface import HFSpaceLink
from operators.triggers.hf_space import ERROR_STAGES

RESCHEDULE_FROM_S = 60  # poke intervals from this long on free the worker slot between pokes


class HFSpaceRuntimeSensor(BaseSensorOperator):
    """Poke ``GET /api/spaces/<id>/runtime`` until the stage is RUNNING.

    Fails at once (no retries) on BUILD_ERROR / RUNTIME_ERROR / CONFIG_ERROR with the stage's error message,
    and on a timeout. Skips when ``settings`` is None, the publish record has no ``space_id``, or ``main``
    did not move (a backfill or a no-op leaves the Space alone). Waits ``space_timeout_s`` polling every
    ``space_poke_interval_s`` (poke, or reschedule when the interval is 60 s or more); with ``deferrable``
    (argument or ``settings.deferrable``) the wait runs in the triggerer
    (:class:`~operators.triggers.hf_space.HFSpaceRuntimeTrigger`).

    The wait is measured from the first try's start, as Airflow's own sensor timeout is: in reschedule mode
    each poke is a new try, so ``waited_s`` counts from the first reschedule's start date, not from this poke.

    :param model: the model's name in config/models.yaml.
    :param published: the publish task's record (``space_id``, ``space_url``, ``main_moved``). (templated)
    :param settings: the model's ``hf`` section (or its ``model_dump()``), or None (skip).
    :param deferrable: wait in the triggerer instead of a worker slot.

    Returns ``{"space_id", "stage", "url", "waited_s"}``.
    """

    template_fields: Sequence[str] = ("published",)
    operator_extra_links = (HFSpaceLink(),)
    ui_color = "#fff8e1"

    def __init__(self, *, model: str, published: Any, settings: HFSettings | Mapping[str, Any] | None,
                 deferrable: bool = False, **kwargs: Any) -> None:
        hf = section(HFSettings, settings, model=model, name="hf") if settings else None
        interval = (hf or HFSettings.model_construct()).space_poke_interval_s
        kwargs.setdefault("poke_interval", interval)
        kwargs.setdefault("timeout", (hf or HFSettings.model_construct()).space_timeout_s)
        kwargs.setdefault("mode", "reschedule" if interval >= RESCHEDULE_FROM_S else "poke")
        super().__init__(**kwargs)
        self.model = model
        self.published = published
        self.settings = hf
        self.deferrable = bool(deferrable or (hf is not None and hf.deferrable))
        self._started: datetime | None = None
        self._last: tuple[str | None, str | None] = (None, None)

    @cached_property
    def hook(self) -> HuggingFaceHook:
        """The Hub account of ``hf.conn_id``."""
        return HuggingFaceHook(self.settings.conn_id if self.settings else HuggingFaceHook.default_conn_name)

    def execute(self, context: Context) -> Any:
        """Skip, defer, or poke; a timeout fails with the last stage seen."""
        space_id = self._space_id()
        self._started = self._wait_started(context)
        if self.deferrable:
            from operators.triggers.hf_space import HFSpaceRuntimeTrigger

            # One read here first: a Space already RUNNING (or broken) needs no triggerer, and the trigger does
            # not fire within seconds of the deferral, where Airflow 3.3.2 can lose a resumed task's result.
            first = self.poke(context)
            if isinstance(first, PokeReturnValue) and first.is_done:
                return first.xcom_value

            self.log.info("deferring the wait for Space %s to the triggerer (up to %.0f s)", space_id, self.timeout)
            self.defer(trigger=HFSpaceRuntimeTrigger(
                space_id=space_id, conn_id=self.hook.hf_conn_id, endpoint=self._endpoint(),
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

        space_id = self._space_id()
        settings = cast(HFSettings, self.settings)  # _space_id() skipped the task without settings
        with engine_errors(self.model):
            api = self.hook.get_conn(endpoint=self._endpoint())
            call = HubCaller(self.model, secrets=(api.token,), max_retries=settings.max_retries,
                             endpoint=api.endpoint)
            stage, message = call("read the runtime of the Space", space_id, space_stage, api, space_id)
        self._last = (stage, message)
        return self._judge(space_id, stage, message, self._waited())

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: RUNNING passes, an error stage or a timeout fails at once."""
        if not isinstance(event, dict) or "status" not in event:
            raise AirflowFailException(f"model {self.model!r}: unexpected event from HFSpaceRuntimeTrigger: {event!r}")
        space_id = self._space_id()
        self._last = (event.get("stage"), event.get("message"))
        if event["status"] == "timeout":
            raise AirflowFailException(self._timeout_message(float(event.get("waited_s") or 0)))
        result = self._judge(space_id, event.get("stage"), event.get("message"), float(event.get("waited_s") or 0))
        if isinstance(result, PokeReturnValue):
            return result.xcom_value
        raise AirflowFailException(f"model {self.model!r}: Space {space_id} ended the wait at stage "
                                   f"{event.get('stage')!r}: {event.get('message')}")

    # --- helpers --------------------------------------------------------------------------------------------
    def _wait_started(self, context: Context) -> datetime:
        """When the wait began: in reschedule mode the first try's start (the task SDK's sensor does the same)."""
        ti = context.get("ti")
        if self.reschedule and ti is not None:
            first = ti.get_first_reschedule_date(context)
            if first is not None:
                return first
        return datetime.now(UTC)

    def _waited(self) -> float:
        return (datetime.now(UTC) - self._started).total_seconds() if self._started else 0.0

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

    def _endpoint(self) -> str | None:
        """The endpoint from the publish record's URL (so the sensor asks the Hub the task published to)."""
        published = self.published if isinstance(self.published, dict) else {}
        url = str(published.get("space_url") or "")
        return url.split("/spaces/")[0] if "/spaces/" in url else None

    def _url(self, space_id: str) -> str:
        published = self.published if isinstance(self.published, dict) else {}
        return str(published.get("space_url") or f"https://huggingface.co/spaces/{space_id}")

    def _timeout_message(self, waited: float | None = None) -> str:
        stage, message = self._last
        waited = self._waited() if waited is None else waited
        return (f"model {self.model!r}: Space {self._space_id()} did not reach RUNNING within {self.timeout:.0f} s "
                f"(waited {waited:.1f} s; last stage {stage!r}{': ' + message if message else ''}). Fix: raise "
                "hf.space_timeout_s for slow builds, or check the Space's build logs")
