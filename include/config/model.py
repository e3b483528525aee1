"""A model's entry (all its sections), the deployment-wide settings, and a loaded config file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from include.config.expand import expand_path
from include.config.pools import PoolSettings
from include.config.sections import (
    FidelitySettings,
    HealthSettings,
    HFSettings,
    LMStudioSettings,
    LocalSource,
    MergeSettings,
    NotifySettings,
    QuantizeSettings,
    RetentionSettings,
    RetrySettings,
    SSHSource,
    StrictModel,
    VastAISource,
    WorkerSettings,
)
from include.errors import ConfigError

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ModelConfig(StrictModel):
    """One model: where its adapter comes from and how it is deployed."""

    name: str
    description: str = ""
    base_model: str = Field(description="local directory of the base model (or a Hugging Face repo id in the cache)")
    source: Annotated[LocalSource | SSHSource | VastAISource, Field(discriminator="kind")]
    merge: MergeSettings = MergeSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    lmstudio: LMStudioSettings = LMStudioSettings()
    hf: HFSettings | None = None
    health: HealthSettings = HealthSettings()
    schedule: str | None = None
    retry: RetrySettings = RetrySettings()
    notify: NotifySettings = NotifySettings()
    workers: WorkerSettings = WorkerSettings()
    fidelity: FidelitySettings = FidelitySettings()
    retention: RetentionSettings = RetentionSettings()
    tags: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not MODEL_NAME.match(value):
            raise ValueError(
                f"model name {value!r} must be 1-63 lowercase letters, digits, '_' or '-' (it becomes the DAG id)"
            )
        return value

    @field_validator("base_model")
    @classmethod
    def _base(cls, value: str) -> str:
        return expand_path(value) if value.startswith(("~", "/", "./", "../")) else value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        # A field validator, so the error names `models.<name>.schedule` (a model validator's has no field).
        if value is not None and not value.startswith("@"):
            from croniter import croniter

            if not croniter.is_valid(value):
                raise ValueError(f"schedule {value!r} is not a valid cron expression")
        return value

    @property
    def dag_id(self) -> str:
        """The id of this model's deploy DAG."""
        return f"deploy_{self.name}"

    @property
    def lmstudio_repo(self) -> str:
        """The repo directory under the publisher in the LM Studio models tree."""
        return self.lmstudio.repo or f"{self.name}-GGUF"


class Settings(StrictModel):
    """Deployment-wide settings."""

    artifact_root: str = "${AIRFLOW_HOME:-~/airflow}/lora-deploy/artifacts"
    llama_cpp_dir: str | None = Field(None, description="a llama.cpp checkout to use instead of the pinned one")
    llama_cpp_bin_dir: str | None = Field(None, description="a dir with llama-quantize/llama-imatrix to use instead")
    pools: dict[str, PoolSettings] = Field(default_factory=dict,
                                           description="Airflow pools to create/resize (lora-deploy-trigger pools)")

    @field_validator("artifact_root", "llama_cpp_dir", "llama_cpp_bin_dir")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return None if value is None else expand_path(value)


@dataclass
class LoadedConfig:
    """The result of loading a config file: valid models, and an error per invalid model."""

    path: Path
    settings: Settings
    models: dict[str, ModelConfig] = field(default_factory=dict)
    errors: dict[str, ConfigError] = field(default_factory=dict)
