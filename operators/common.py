"""What every lora-deploy operator shares: engine errors mapped to Airflow's, rendered flags, GGUF record shapes,
and the config sections an operator is given (validated once, so no default is restated outside include/config).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

from airflow.sdk.exceptions import AirflowFailException
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from include.config.sections import LocalSource, SSHSource, VastAISource
from include.errors import ConfigError, LoraDeployError

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
