"""Errors of the engine: one base class, one tree grouped by concern (config, source, merge, gguf, resources,
install, health, hub, trigger).

Every message names the model (when known), says what was wrong quoting the value, and gives the fix,
so that a failed Airflow task tells the user what to do without reading code. Where a builtin exception says
the same thing (a malformed file is a ``ValueError``), the error also derives from it, so generic callers can
catch it the builtin way. Standard library only: ``python -m include.cli.toolchain`` imports this module before
the project's dependencies are installed.
"""

from __future__ import annotations


class LoraDeployError(Exception):
    """Base of all engine errors; ``str()`` reads ``model 'x': <what>. Fix: <fix>``.

    ``retryable`` says whether trying again can help (a flaky link) or not (a wrong config): the Airflow
    layer fails non-retryable errors at once instead of burning the task's retries.
    """

    retryable = False

    def __init__(self, message: str, *, model: str | None = None, fix: str | None = None) -> None:
        self.detail = message
        self.model = model
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        """The full message: model prefix, detail and fix."""
        text = f"model {self.model!r}: {self.detail}" if self.model else self.detail
        if self.fix:
            text = f"{text.rstrip('.')}. Fix: {self.fix}"
        return text

    def for_model(self, model: str) -> LoraDeployError:
        """Return this error with the model filled in (engine code often does not know it)."""
        if self.model is None:
            self.model = model
            self.args = (self.render(),)
        return self


# --- config ---------------------------------------------------------------------------------------------------
class ConfigError(LoraDeployError):
    """config/models.yaml (or a run's conf, or an operator's settings) is invalid."""


# --- source: where the adapter comes from -----------------------------------------------------------------------
class SourceError(LoraDeployError):
    """The adapter could not be found, listed or fetched from its source."""


class TransientSourceError(SourceError):
    """A source failed in a way that may pass: a dropped link, a timeout, HTTP 429 or 5xx."""

    retryable = True


class IntegrityError(SourceError):
    """A file's sha256 or size does not match what the source announced."""

    retryable = True


class VastAIError(SourceError):
    """The Vast.ai API refused the request for a reason a retry cannot fix (bad key, unknown or stopped instance)."""


class VastAITransientError(TransientSourceError):
    """The Vast.ai API did not answer usefully this time (timeout, 429, 5xx): retried with backoff."""


# --- merge ------------------------------------------------------------------------------------------------------
class MergeError(LoraDeployError):
    """The adapter cannot be merged into the base model."""


class UnsupportedAdapterError(MergeError):
    """The adapter uses a LoRA feature the streaming merge does not implement (the peft backend may)."""


class SafetensorsFormatError(LoraDeployError, ValueError):
    """A safetensors file or model directory is malformed or holds something we cannot decode."""


# --- gguf -------------------------------------------------------------------------------------------------------
class GGUFError(LoraDeployError):
    """Conversion, quantization or validation of a GGUF failed."""


class ToolchainError(GGUFError):
    """The pinned llama.cpp toolchain is missing, corrupt or could not be built."""


# --- resources: the worker's memory and disk ----------------------------------------------------------------------
class ResourceError(LoraDeployError):
    """A stage needs more memory or disk than its worker has; retrying on the same worker cannot add any."""


class OutOfMemoryError(ResourceError, MemoryError):
    """The kernel's OOM killer ended a stage's process (a tool it ran, or the task process itself)."""


# --- install, health --------------------------------------------------------------------------------------------
class InstallError(LoraDeployError):
    """A GGUF could not be installed into the LM Studio models tree."""


class HealthError(LoraDeployError):
    """The served model is not healthy."""

    retryable = True


# --- hub: the Hugging Face model repo and Space -----------------------------------------------------------------
class PublishError(LoraDeployError):
    """Publishing to the Hugging Face Hub failed."""


class TransientPublishError(PublishError):
    """The Hub kept answering 429/5xx (or the link dropped) after the in-call retries: the task retries later."""

    retryable = True


# --- trigger: Airflow's REST API, called by training jobs -------------------------------------------------------
class TriggerError(LoraDeployError):
    """The api-server refused or could not be reached; the message says what to fix."""


# --- deployments: the Deployments page ----------------------------------------------------------------------------
class UnknownModelError(LookupError):
    """A model name that is not in the config; the message lists the configured models (the page answers 404)."""
