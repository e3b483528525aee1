"""What every lora-deploy operator shares: engine errors mapped to Airflow's, rendered flags, GGUF record shapes,
the config sections an operator is given (validated once, so no default is restated outside include/config), and
the memory guard of the heavy stages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from airflow.sdk.exceptions import AirflowFailException
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from include.config.sections import LocalSource, SSHSource, VastAISource, WorkerSettings
from include.errors import ConfigError, LoraDeployError

if TYPE_CHECKING:
    from include.resources.guard import StageEstimate

log = logging.getLogger(__name__)
S = TypeVar("S", bound=BaseModel)
SourceSettings = LocalSource | SSHSource | VastAISource


@contextmanager
def engine_errors(model: str) -> Iterator[None]:
    """Name the model in engine errors; fail at once (no retries) when retrying cannot help."""
    try:
        yield
    except LoraDeployError as err:
        err.for_model(model)
        if not err.retryable:
            raise AirflowFailException(str(err)) from err
        raise


def section(cls: type[S], value: S | Mapping[str, Any] | None, *, model: str, name: str) -> S:
    """``value`` as the config section ``cls``: a section is kept, a mapping (e.g. ``model_dump()``) validated.

    The section's own defaults fill what the mapping leaves out, so operators read ``settings.max_tokens``
    and never restate a default. An invalid mapping is a ConfigError naming the model, the section and the field.
    """
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(dict(value or {}))
    except ValidationError as err:
        raise ConfigError(f"invalid `{name}` settings: {_errors(err)}", model=model,
                          fix=f"correct models.{model}.{name} in config/models.yaml (or the operator's argument)"
                          ) from None


def source_section(value: SourceSettings | Mapping[str, Any], *, model: str) -> SourceSettings:
    """A model's ``source`` section (local, ssh or vastai, by its ``kind``), validated like :func:`section`."""
    if isinstance(value, (LocalSource, SSHSource, VastAISource)):
        return value
    try:
        return TypeAdapter(Annotated[SourceSettings, Field(discriminator="kind")]).validate_python(dict(value))
    except ValidationError as err:
        raise ConfigError(f"invalid `source` settings: {_errors(err)}", model=model,
                          fix=f"correct models.{model}.source in config/models.yaml (kind: local, ssh or vastai)"
                          ) from None


def _errors(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in err.errors())


def as_bool(value: object) -> bool:
    """A rendered templated flag as a bool: native True/False, or the strings 'true'/'false' (any case)."""
    return value if isinstance(value, bool) else str(value).strip().lower() == "true"


def gguf_files(ggufs: Any) -> list[dict[str, Any]]:
    """The GGUF file records a stage consumes, from any shape the quantize stage hands over.

    The mapped ``quantize`` task gives one file record per map index (pulled downstream as a lazy
    sequence); a single record, or a legacy ``{"files": [...]}`` record, are accepted as well.
    """
    if isinstance(ggufs, dict):
        return [dict(f) for f in ggufs["files"]] if "files" in ggufs else [dict(ggufs)]
    return [dict(f) for f in ggufs if f]


def workers_section(value: WorkerSettings | Mapping[str, Any] | None, *, model: str) -> WorkerSettings:
    """A model's ``workers`` section (its memory budget), validated like :func:`section`; None: the defaults."""
    return section(WorkerSettings, value, model=model, name="workers")


@contextmanager
def memory_guard(operator: Any, context: Any, stage: str, estimate: Callable[[], StageEstimate]) -> Iterator[None]:
    """Guard a heavy stage on the worker running it (:func:`include.resources.guard.stage_guard`).

    Enter it inside :func:`engine_errors` (``with engine_errors(model), memory_guard(self, context, ...)``): a stage
    whose ``estimate()`` does not fit this worker (MemAvailable, the cgroup's limit, ``workers.memory_budget_mb``)
    fails before it starts, a tool the OOM killer ends fails the task, and so does the next try of a task whose
    process the OOM killer ended (its attempt record, kept on the worker: :mod:`include.resources.attempts`): none is
    retried. ``operator`` has ``model`` and ``workers`` (a WorkerSettings). When the inputs cannot be sized (a
    missing file), the stage runs unchecked and reports that error itself.
    """
    from include.resources.attempts import default_directory
    from include.resources.guard import StageEstimate, stage_guard
    from include.resources.memory import worker_memory

    try:
        found = estimate()
    except (LoraDeployError, OSError) as err:
        log.warning("no memory estimate for stage %s (%s): it runs unchecked", stage, err)
        found = StageEstimate(stage=stage, peak_bytes=0, basis="no estimate")
    ti = context.get("ti")
    key = "/".join(str(getattr(ti, name, "")) for name in ("dag_id", "run_id", "task_id", "map_index"))
    records = default_directory() if ti is not None else None
    with stage_guard(found, worker_memory(operator.workers.memory_budget_mb), records=records, key=key):
        yield
