"""The sections of a model's entry in config/models.yaml: source, merge, quantize, LM Studio, Hugging Face,
health, retries, notifications, workers, the fidelity gate and the artifact store's retention.

Each is a strict, frozen pydantic model (unknown keys are errors); :mod:`include.config` assembles them into
a :class:`~include.config.ModelConfig` and loads the file.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from include.config.expand import expand_path

QUANT_NAME = re.compile(r"^[A-Z0-9_]+$")
STAGES = ("download", "merge", "quantize", "install", "health", "publish")


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalSource(StrictModel):
    """Checkpoints in a directory on this machine (or a mounted volume)."""

    kind: Literal["local"]
    path: str = Field(description="directory that holds the checkpoint-* directories")
    checkpoint_glob: str = "checkpoint-*"

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return expand_path(value)


class SSHSource(StrictModel):
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


class VastAISource(StrictModel):
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


class MergeSettings(StrictModel):
    """How the adapter is merged into the base model."""

    backend: Literal["streaming", "fused", "peft", "unsloth", "auto"] = Field(
        "fused", description="fused (default): the exact streaming merge done inside the GGUF conversion, no merged "
        "model on disk; streaming: write the merged safetensors into the artifact store (exact, constant memory), "
        "then convert; peft: reference, whole model in RAM; unsloth: CUDA only; auto: fused when the adapter and "
        "dtype allow it, else streaming, or peft for adapter features streaming does not merge. Left out with a "
        "dtype other than auto: streaming (a dtype change needs a merged model)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_shard_mb: int = Field(2048, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and "backend" not in data and data.get("dtype", "auto") != "auto":
            return {**data, "backend": "streaming"}  # fused keeps the base's dtype: converting one needs a merge
        return data

    @model_validator(mode="after")
    def _fused_keeps_dtype(self) -> MergeSettings:
        if self.backend == "fused" and self.dtype != "auto":
            raise ValueError(f"merge.backend fused keeps the base model's dtype, so merge.dtype must be 'auto' "
                             f"(got {self.dtype!r}); the GGUF's type is quantize.outtype; or set "
                             "merge.backend: streaming to write a merged model in that dtype")
        return self


class ImatrixSettings(StrictModel):
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


class QuantizeSettings(StrictModel):
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


class LMStudioSettings(StrictModel):
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


class HFSettings(StrictModel):
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


class HealthSettings(StrictModel):
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


class RetryPolicy(StrictModel):
    """Retries of one stage; unset fields come from ``retry.default``."""

    retries: int | None = Field(None, ge=0)
    delay_s: float | None = Field(None, ge=0)
    backoff: float | None = Field(None, ge=0, description="exponential multiplier; 0 turns backoff off")
    max_delay_s: float | None = Field(None, gt=0)


class RetrySettings(StrictModel):
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


class NotifySettings(StrictModel):
    """Where run results are reported."""

    slack_conn_id: str | None = "slack_webhook_default"


class WorkerSettings(StrictModel):
    """Where the heavy stages (merge, convert, quantize) run, how many may run at once, and the memory they may use."""

    heavy_queue: str | None = Field(None, description="Celery queue of the heavy stages (e.g. 'gpu'); None: default")
    heavy_pool: str | None = Field(None, description="Airflow pool that limits concurrent heavy tasks; None: default")
    heavy_pool_slots: int = Field(1, ge=1, description="pool slots one heavy task takes")
    memory_budget_mb: int | None = Field(
        None, ge=1, description="memory (MB) this model's tasks may use on a worker, below what the worker has "
        "(MemAvailable, capped by its cgroup); a stage whose estimate exceeds it fails before it starts. None: all "
        "the worker has")


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


class FidelitySettings(StrictModel):
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


class RetentionSettings(StrictModel):
    """What the artifact store keeps after a deploy (the ``retention`` task at the end of ``deploy_<model>``).

    Kept: every store entry of the versions the LM Studio ledger keeps (current, previous and the newest
    ``lmstudio.keep_versions``): their quant GGUFs, adapter and fidelity figures, and - with ``keep_intermediates``
    - their f16 GGUF, merged model and imatrix. Also kept: whatever a run that is still going (or failed less than
    ``lease_hours`` ago) has used. Everything else is removed.
    """

    enabled: bool = Field(True, description="false: the retention task only reports what it would free")
    keep_intermediates: bool = Field(False, description="keep the f16 GGUF, merged safetensors and imatrix of kept "
                                                        "versions (re-runs and new quant types start from them)")
    lease_hours: float = Field(24, gt=0, description="entries a run used stay protected this long after its last use "
                                                     "(runs in progress, failed runs awaiting a retry); also how long "
                                                     "an untouched download resume cache is kept")
