"""Errors of the engine: one base class, one subclass per stage.

Every message names the model (when known), says what was wrong quoting the value, and gives the fix,
so that a failed Airflow task tells the user what to do without reading code.
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


class ConfigError(LoraDeployError):
    """config/models.yaml (or a run's conf) is invalid."""


class SourceError(LoraDeployError):
    """The adapter could not be found, listed or fetched from its source."""


class IntegrityError(SourceError):
    """A file's sha256 or size does not match what the source announced."""

    retryable = True


class MergeError(LoraDeployError):
    """The adapter cannot be merged into the base model."""


class GGUFError(LoraDeployError):
    """Conversion, quantization or validation of a GGUF failed."""


class InstallError(LoraDeployError):
    """A GGUF could not be installed into the LM Studio models tree."""


class PublishError(LoraDeployError):
    """Publishing to the Hugging Face Hub failed."""


class HealthError(LoraDeployError):
    """The served model is not healthy."""

    retryable = True


class TransientSourceError(SourceError):
    """A source failed in a way that may pass: a dropped link, a timeout, HTTP 429 or 5xx."""

    retryable = True


class VastAIError(SourceError):
    """The Vast.ai API refused the request for a reason a retry cannot fix (bad key, unknown or stopped instance)."""


class VastAITransientError(TransientSourceError):
    """The Vast.ai API did not answer usefully this time (timeout, 429, 5xx): retried with backoff."""
