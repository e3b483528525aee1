"""config/models.yaml: the typed schema and a loader that validates each model on its own.

The file has three top-level keys::

    settings:  {artifact_root: ..., llama_cpp_dir: ...}   # one per deployment
    defaults:  {...}                                      # deep-merged under every model entry
    models:    {<name>: {...}, ...}                       # one DAG per entry

A problem with the file as a whole (YAML syntax, ``models`` not a mapping, bad settings) raises
:class:`ConfigError`. A problem inside one model entry is collected per model, so one bad entry breaks
only that model's DAG. Strings may use ``${VAR}`` or ``${VAR:-default}``; paths may start with ``~``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from include.errors import ConfigError
from include.expand import expand_env, expand_path
from include.pools import PoolSettings, check_heavy_pool

# libyaml's safe loader parses a 500-model file ~10x faster than the pure-Python one (same semantics).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
QUANT_NAME = re.compile(r"^[A-Z0-9_]+$")
STAGES = ("download", "merge", "quantize", "install", "health", "publish")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSource(_Strict):
    """Checkpoints in a directory on this machine (or a mounted volume)."""

    kind: Literal["local"]
    path: str = Field(description="directory that holds the checkpoint-* directories")
    checkpoint_glob: str = "checkpoint-*"

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return expand_path(value)


class SSHSource(_Strict):
    """Checkpoints on a training box reached through an Airflow SSH connection."""

    kind: Literal["ssh"]
    ssh_conn_id: str
    remote_dir: str = Field(description="absolute directory on the box that holds the checkpoint-* directories")
    checkpoint_glob: str = "checkpoint-*"
    transfer: Literal["auto", "rsync", "sftp"] = Field("auto", description="auto: rsync when both ends have it")
    verify_host_key: bool = Field(True, description="false skips the SSH host key check (explicit opt-out)")

    @field_validator("remote_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _remote_dir(value)


class VastAISource(_Strict):
    """Checkpoints on a Vast.ai instance: its SSH endpoint comes from the Vast.ai API at run time."""

    kind: Literal["vastai"]
    instance_id: str = Field(description="the numeric instance id (`vastai show instances`)")
    remote_dir: str = Field(description="absolute directory on the instance that holds the checkpoint-* directories")
    ssh_conn_id: str | None = Field(None, description="SSH connection with login, key_file and host_key "
                                                      "(its host/port are replaced by the instance's)")
    vastai_conn_id: str = Field("vastai_default", description="connection whose password is the API key")
    api_url: str | None = Field(None, description="Vast.ai API base URL (default: connection host, $VAST_URL, "
                                                  "https://console.vast.ai)")
    checkpoint_glob: str = "checkpoint-*"
    transfer: Literal["auto", "rsync", "sftp"] = "auto"
    verify_host_key: bool = True

    @field_validator("instance_id", mode="before")
    @classmethod
    def _numeric(cls, value: Any) -> str:
        text = str(value).strip()
        if not text.isdigit():
            raise ValueError(f"instance_id must be the numeric Vast.ai instance id, got {value!r}")
        return text

    @field_validator("remote_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _remote_dir(value)


def _remote_dir(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"remote_dir must be an absolute path on the training box, got {value!r}")
    if ".." in value.split("/") or any(c in value for c in "\n\0`$;|&<>*?'\""):
        raise ValueError(f"remote_dir {value!r} may not contain '..' or shell metacharacters")
    return value


class MergeSettings(_Strict):
    """How the adapter is merged into the base model."""

    backend: Literal["streaming", "fused", "peft", "unsloth", "auto"] = Field(
        "streaming", description="streaming: exact, constant memory (default); fused: the streaming merge done "
        "inside the GGUF conversion, no merged model written (same GGUF, faster); peft: reference, whole model "
        "in RAM; unsloth: CUDA only; auto: streaming, or peft for adapter features streaming does not merge")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_shard_mb: int = Field(2048, gt=0)

    @model_validator(mode="after")
    def _fused_keeps_dtype(self) -> MergeSettings:
        if self.backend == "fused" and self.dtype != "auto":
            raise ValueError(f"merge.backend fused keeps the base model's dtype, so merge.dtype must be 'auto' "
                             f"(got {self.dtype!r}); the GGUF's type is quantize.outtype")
        return self


class ImatrixSettings(_Strict):
    """Calibration text of the importance matrix (llama-imatrix); required by IQ types, used by all quants."""

    calibration_file: str | None = Field(None, description="text file the importance matrix is computed from")
    use_builtin_text: bool = Field(False, description="use the small built-in calibration text")
    chunks: int = Field(8, ge=1, description="llama-imatrix --chunks")
    ctx_size: int = Field(128, ge=16, description="llama-imatrix context size per chunk")

    @field_validator("calibration_file")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return None if value is None else expand_path(value)

    @property
    def configured(self) -> bool:
        """True when a calibration text is available."""
        return bool(self.calibration_file) or self.use_builtin_text


class QuantizeSettings(_Strict):
    """Which GGUF files are produced."""

    types: list[str] = Field(default_factory=lambda: ["Q8_0", "Q4_K_M"], min_length=1)
    outtype: Literal["f16", "bf16", "f32"] = "f16"
    min_type_fraction: float = Field(0.5, gt=0, le=1)
    on_fallback: Literal["fail", "warn"] = Field("fail", description="when llama.cpp silently used other types")
    imatrix: ImatrixSettings = ImatrixSettings()
    output_tensor_type: str | None = Field(None, description="llama-quantize --output-tensor-type (e.g. Q8_0)")
    token_embedding_type: str | None = Field(None, description="llama-quantize --token-embedding-type")
    pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer name for an unknown BPE hash")
    split_max_size: str | None = Field(None, pattern=r"^[0-9]+[MG]$", description="split GGUFs, e.g. '2G'")
    use_temp_file: bool = Field(False, description="converter --use-temp-file (less RAM for large models)")
    check_tokenizer: bool = Field(True, description="compare llama.cpp and HF tokenization after conversion")
    max_parallel: int | None = Field(
        1, ge=1, description="quantize tasks of one run at once (llama-quantize already uses every core of its "
                             "machine: on one machine, 1 is fastest); None: no limit (spread over Celery workers)")

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _tensor_type(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().upper()
        if not QUANT_NAME.match(value):
            raise ValueError(f"{value!r} is not a ggml tensor type name (e.g. Q8_0, F16, Q6_K)")
        return value

    @model_validator(mode="after")
    def _iq_needs_imatrix(self) -> QuantizeSettings:
        if self.use_temp_file and self.split_max_size:
            raise ValueError("quantize.use_temp_file and quantize.split_max_size cannot be combined (converter limit)")
        needing = [t for t in self.types if t.startswith("IQ")]
        if needing and not self.imatrix.configured:
            raise ValueError(
                f"quantization type(s) {needing} need an importance matrix, but no calibration text is configured: "
                "set quantize.imatrix.calibration_file (a text file) or quantize.imatrix.use_builtin_text: true, "
                "or drop the IQ types"
            )
        return self

    @field_validator("types")
    @classmethod
    def _names(cls, values: list[str]) -> list[str]:
        normalised = [v.strip().upper() for v in values]
        for value in normalised:
            if not QUANT_NAME.match(value):
                raise ValueError(f"{value!r} is not a llama.cpp quantization type name (e.g. Q4_K_M, Q8_0)")
        if len(set(normalised)) != len(normalised):
            raise ValueError(f"duplicate quantization types in {values!r}")
        return normalised


class LMStudioSettings(_Strict):
    """Where and under which names the GGUFs are installed for LM Studio, and how they are loaded and kept."""

    home: str | None = Field(None, description="LM Studio's home; None: discovered (~/.lmstudio-home-pointer, "
                                               "~/.lmstudio, ~/.cache/lm-studio)")
    models_dir: str | None = Field(None, description="the models tree; None: <home>/models")
    publisher: str = Field("lora-deploy", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    repo: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    endpoint: str | None = Field(None, description="live OpenAI-compatible server (LM Studio) checked after install")
    keep_versions: int = Field(3, ge=1, description="versions kept installed; older ones are pruned "
                                                    "(the current and previous never are)")
    context_length: int | None = Field(None, gt=0, description="`lms load --context-length`; None: LM Studio's")
    gpu: Literal["max", "off"] | Annotated[float, Field(ge=0, le=1)] = Field("max", description="`lms load --gpu`")
    lms_path: str | None = Field(None, description="the `lms` CLI; None: looked up on PATH")
    identifier: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
                                   description="the API identifier the model is loaded as; None: the model name")
    quant: str | None = Field(None, description="the quant type that is served and health-checked; "
                                                "None: the first of quantize.types")

    @field_validator("models_dir", "home")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return None if value is None else expand_path(value)


class HFSettings(_Strict):
    """Publication to a Hugging Face model repo and (optionally) a Space."""

    repo_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    space_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    private: bool = True
    conn_id: str = "huggingface_default"
    space_hardware: str = "cpu-basic"
    space_quant: str | None = Field(None, description="the quant the Space serves; default the first published")
    system_prompt: str = Field("You are a helpful assistant.", description="the Space's SYSTEM_PROMPT variable")
    space_timeout_s: float = Field(1800, gt=0, description="give up waiting for the Space to run after this long")
    space_poke_interval_s: float = Field(30, gt=0, description="seconds between Space runtime checks")
    deferrable: bool = Field(False, description="wait for the Space in the triggerer (long builds)")
    max_retries: int = Field(4, ge=0, le=10, description="retries of one Hub call on HTTP 429/5xx (Retry-After)")


class HealthSettings(_Strict):
    """The smoke test of the produced GGUF (before promotion) and the live check of LM Studio (after it)."""

    prompt: str = Field("Say hello.", description="the test prompt (user message)")
    system_prompt: str = Field("You are a helpful assistant.", description="the model's system prompt")
    max_tokens: int = Field(16, gt=0)
    min_answer_tokens: int = Field(1, ge=1, description="the answer must have at least this many tokens")
    startup_timeout_s: float = Field(120, gt=0)
    max_latency_s: float = Field(60, gt=0)
    min_tokens_per_s: float = Field(0, ge=0)
    mode: Literal["poke", "reschedule"] = Field("poke", description="sensor mode of the live check")
    poke_interval_s: float = Field(10, gt=0)
    timeout_s: float = Field(900, gt=0, description="give up on the live endpoint after this long")
    deferrable: bool = Field(False, description="wait for the live endpoint in the triggerer (long waits)")


class RetryPolicy(_Strict):
    """Retries of one stage; unset fields come from ``retry.default``."""

    retries: int | None = Field(None, ge=0)
    delay_s: float | None = Field(None, ge=0)
    backoff: float | None = Field(None, ge=0, description="exponential multiplier; 0 turns backoff off")
    max_delay_s: float | None = Field(None, gt=0)


class RetrySettings(_Strict):
    """Retry policy per stage."""

    default: RetryPolicy = RetryPolicy(retries=2, delay_s=30, backoff=2.0, max_delay_s=600)
    download: RetryPolicy = RetryPolicy(retries=5)
    merge: RetryPolicy = RetryPolicy()
    quantize: RetryPolicy = RetryPolicy()
    install: RetryPolicy = RetryPolicy()
    health: RetryPolicy = RetryPolicy()
    publish: RetryPolicy = RetryPolicy(retries=4)

    def for_stage(self, stage: str) -> RetryPolicy:
        """The stage's policy with the defaults filled in."""
        own = getattr(self, stage).model_dump(exclude_none=True)
        return RetryPolicy(**{**self.default.model_dump(exclude_none=True), **own})


class NotifySettings(_Strict):
    """Where run results are reported."""

    slack_conn_id: str | None = "slack_webhook_default"


class WorkerSettings(_Strict):
    """Where the heavy stages (merge, convert, quantize) run and how many may run at once."""

    heavy_queue: str | None = Field(None, description="Celery queue of the heavy stages (e.g. 'gpu'); None: default")
    heavy_pool: str | None = Field(None, description="Airflow pool that limits concurrent heavy tasks; None: default")
    heavy_pool_slots: int = Field(1, ge=1, description="pool slots one heavy task takes")


DEFAULT_FIDELITY_PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: what is 12 times 7? Answer:",
)
# Perplexity of a quant / perplexity of the f16 GGUF, at most (llama.cpp's published KL/PPL figures, with margin).
DEFAULT_MAX_PPL_RATIO = {
    "default": 1.50, "F32": 1.001, "F16": 1.001, "BF16": 1.01, "Q8_0": 1.02, "Q6_K": 1.03, "Q5_K_M": 1.05,
    "Q5_K_S": 1.06, "Q5_1": 1.06, "Q5_0": 1.07, "Q4_K_M": 1.10, "Q4_K_S": 1.12, "Q4_1": 1.15, "Q4_0": 1.15,
    "IQ4_NL": 1.12, "IQ4_XS": 1.12, "Q3_K_L": 1.20, "Q3_K_M": 1.25, "Q3_K_S": 1.35, "IQ3_M": 1.25, "IQ3_S": 1.30,
    "IQ3_XS": 1.35, "IQ3_XXS": 1.40, "Q2_K": 1.60, "Q2_K_S": 1.70, "IQ2_M": 1.70, "IQ2_S": 1.90, "IQ2_XS": 2.0,
    "IQ2_XXS": 2.3, "IQ1_M": 3.0, "IQ1_S": 3.5,
}


class FidelitySettings(_Strict):
    """The fidelity gate: merged HF model vs the f16 GGUF (logits), and each quant vs f16 (perplexity)."""

    enabled: bool = True
    mode: Literal["fail", "warn"] = Field("fail", description="fail the task, or log a warning, when over a threshold")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_FIDELITY_PROMPTS), min_length=1,
                               description="fixed prompts whose logits are compared")
    max_abs_logit_diff: float = Field(1.0, gt=0, description="max |logit_hf - logit_gguf| over all positions")
    max_kl: float = Field(0.01, gt=0, description="max KL(softmax_hf || softmax_gguf) per position (nats)")
    eval_text: str | None = Field(None, description="inline evaluation text for perplexity")
    eval_file: str | None = Field(None, description="evaluation text file; default: the built-in include/data/eval.txt")
    n_ctx: int = Field(256, ge=16, le=32768, description="perplexity chunk length (tokens)")
    max_ppl_ratio: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MAX_PPL_RATIO),
                                            description="quant type -> max ppl(quant)/ppl(f16); merged over the "
                                                        "built-in table, `default` for unlisted types")

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, values: list[str]) -> list[str]:
        if any(not v.strip() for v in values):
            raise ValueError("fidelity prompts must be non-empty strings")
        return values

    @field_validator("eval_file")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return None if value is None else expand_path(value)

    @field_validator("max_ppl_ratio")
    @classmethod
    def _ratios(cls, values: dict[str, float]) -> dict[str, float]:
        table = dict(DEFAULT_MAX_PPL_RATIO)
        for key, ratio in values.items():
            name = "default" if key.strip().lower() == "default" else key.strip().upper()
            if name != "default" and not QUANT_NAME.match(name):
                raise ValueError(f"{key!r} is not a quantization type name (e.g. Q4_K_M) or 'default'")
            if not ratio >= 1.0:
                raise ValueError(f"max_ppl_ratio[{key!r}] = {ratio!r}: a quant cannot beat f16, use a ratio >= 1.0")
            table[name] = float(ratio)
        return table

    @model_validator(mode="after")
    def _one_text(self) -> FidelitySettings:
        if self.eval_text is not None and self.eval_file is not None:
            raise ValueError("set fidelity.eval_text or fidelity.eval_file, not both")
        if self.eval_text is not None and len(self.eval_text.split()) < 20:
            raise ValueError("fidelity.eval_text is too short for a perplexity (use at least 20 words)")
        return self


class ModelConfig(_Strict):
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

    @model_validator(mode="after")
    def _schedule(self) -> ModelConfig:
        if self.schedule is not None and not self.schedule.startswith("@"):
            from croniter import croniter

            if not croniter.is_valid(self.schedule):
                raise ValueError(f"schedule {self.schedule!r} is not a valid cron expression")
        return self

    @property
    def dag_id(self) -> str:
        """The id of this model's deploy DAG."""
        return f"deploy_{self.name}"

    @property
    def lmstudio_repo(self) -> str:
        """The repo directory under the publisher in the LM Studio models tree."""
        return self.lmstudio.repo or f"{self.name}-GGUF"


class Settings(_Strict):
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


def default_config_path() -> Path:
    """``$LORA_DEPLOY_CONFIG`` or the project's ``config/models.yaml``."""
    env = os.environ.get("LORA_DEPLOY_CONFIG")
    return Path(env).expanduser() if env else Path(__file__).resolve().parent.parent / "config" / "models.yaml"


def load_config(path: Path | None = None) -> LoadedConfig:
    """Read and validate a config file; per-model problems land in ``errors``, file-level ones raise."""
    path = Path(path) if path else default_config_path()
    raw = _read_yaml(path)
    settings = _validate_settings(raw.get("settings") or {}, path)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must be a mapping, got {type(defaults).__name__}",
                          fix="write `defaults:` as key: value pairs or remove it")
    loaded = LoadedConfig(path=path, settings=settings)
    for name, entry in raw["models"].items():
        try:
            model = validate_model(str(name), entry, defaults)
            check_heavy_pool(model.name, model.workers.heavy_pool, model.workers.heavy_pool_slots, settings.pools)
            loaded.models[str(name)] = model
        except ConfigError as err:
            loaded.errors[str(name)] = err
    return loaded


def validate_model(name: str, entry: Any, defaults: dict[str, Any] | None = None) -> ModelConfig:
    """Validate one model entry (with the defaults merged under it) or raise a ConfigError naming it."""
    if not isinstance(entry, dict):
        raise ConfigError(f"the entry must be a mapping of settings, got {entry!r}", model=name,
                          fix="write the model's settings as key: value pairs under its name")
    try:
        merged = expand_env(_deep_merge(defaults or {}, entry), where=f"models.{name}")
        return ModelConfig(name=name, **merged)
    except ConfigError as err:
        raise err.for_model(name) from None
    except ValidationError as err:
        raise ConfigError(_describe(err, name), model=name, fix=_fix_for(err, name)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}",
                          fix="create it (see config/models.example.yaml) or set LORA_DEPLOY_CONFIG") from err
    try:
        raw = yaml.load(text, Loader=_SAFE_LOADER) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}", fix="correct the YAML syntax at the line shown") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'models:'",
                          fix="see config/models.example.yaml")
    unknown = sorted(set(raw) - {"settings", "defaults", "models"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {unknown}",
                          fix="only 'settings', 'defaults' and 'models' are allowed at the top level")
    if not isinstance(raw.get("models"), dict) or not raw["models"]:
        raise ConfigError(f"{path}: 'models' must be a non-empty mapping of model name -> settings",
                          fix="add at least one model under `models:`")
    return raw


def _validate_settings(raw: Any, path: Path) -> Settings:
    try:
        return Settings(**expand_env(raw, where="settings"))
    except (TypeError, ValidationError) as err:
        raise ConfigError(f"{path}: invalid settings: {err}", fix="see config/models.example.yaml") from None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _location(error: dict[str, Any]) -> str:
    # Discriminated unions put the tag in the location ("source.local.path"); drop it for readers.
    parts = [str(p) for p in error["loc"] if p not in ("local", "ssh", "vastai")]
    return ".".join(parts) or "(entry)"


def _describe(err: ValidationError, name: str) -> str:
    problems = []
    for error in err.errors():
        problems.append(f"field 'models.{name}.{_location(error)}': {error['msg']} (got {error.get('input')!r})")
    return "; ".join(problems)


def _fix_for(err: ValidationError, name: str) -> str:
    fixes = []
    for error in err.errors():
        where = f"models.{name}.{_location(error)}"
        kind = error["type"]
        if kind == "missing":
            fixes.append(f"add `{where}`")
        elif kind == "extra_forbidden":
            fixes.append(f"remove `{where}` or correct its spelling")
        elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
            fixes.append(f"set `models.{name}.source.kind` to 'local', 'ssh' or 'vastai'")
        else:
            fixes.append(f"correct `{where}` as the message says")
    return "; ".join(dict.fromkeys(fixes))
