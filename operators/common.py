"""What every lora-deploy operator shares: running an engine call with errors mapped to Airflow's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from include.errors import LoraDeployError


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
