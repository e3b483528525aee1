"""One ``deploy_<model>`` DAG per entry of config/models.yaml (or ``$LORA_DEPLOY_CONFIG``).

download -> merge -> quantize -> install (LM Studio) -> health -> publish (Hugging Face), each a retried
stage passing small JSON records through XCom; Slack hears about success and failure.

A model whose entry is invalid gets no DAG but an import error of its own, naming the model, the field
and the fix; every other model's DAG still loads. Nothing heavy (torch, transformers, peft, llama_cpp)
is imported here: stages import what they need inside ``execute``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param

from include.config import ModelConfig, Settings, load_config
from include.errors import ConfigError
from operators.download import VastAIDownloadOperator
from operators.gguf import GGUFQuantizeOperator
from operators.health import HealthCheckSensor
from operators.hf_space import HFSpaceDeployOperator
from operators.lmstudio import LMStudioDeployOperator
from operators.merge import MergeOperator
from operators.notify import slack_callback

START_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")


class InvalidModelDAG(DAG):
    """Stands for a model whose config entry is invalid: the DagBag records its error as an import error.

    The DagBag validates each DAG before bagging it and records a failure as an import error of the
    file while the file's other DAGs still load: so one bad entry breaks only its own DAG.
    """

    config_error: ConfigError | None = None

    def validate(self) -> None:
        """Always fails with the model's configuration error."""
        raise self.config_error or ConfigError("invalid model entry")


def stage_args(model: ModelConfig, stage: str) -> dict[str, Any]:
    """Retry arguments of one stage from the model's retry policy."""
    policy = model.retry.for_stage(stage)
    return {
        "retries": policy.retries,
        "retry_delay": timedelta(seconds=policy.delay_s or 0),
        "retry_exponential_backoff": policy.backoff or 0,
        "max_retry_delay": timedelta(seconds=policy.max_delay_s) if policy.max_delay_s else None,
    }


def deploy_params(model: ModelConfig) -> dict[str, Param]:
    """The trigger form: which adapter version, which quant types, whether to redo cached work."""
    return {
        "adapter_version": Param(None, type=["null", "string"], title="Adapter version",
                                 description="Checkpoint directory name on the source (e.g. checkpoint-300). "
                                             "Empty: the newest checkpoint."),
        "quant_types": Param(list(model.quantize.types), type="array", items={"type": "string"}, minItems=1,
                             uniqueItems=True, title="Quantization types",
                             description="llama.cpp types to produce, e.g. Q4_K_M, Q5_K_M, Q8_0."),
        "force": Param(False, type="boolean", title="Force",
                       description="Redo every stage even if its output for the same inputs exists."),
    }


def build_deploy_dag(model: ModelConfig, settings: Settings) -> DAG:
    """The deploy DAG of one model."""
    root = settings.artifact_root
    with DAG(
        dag_id=model.dag_id,
        description=model.description or f"Deploy the LoRA adapter of {model.name}",
        schedule=model.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        params=deploy_params(model),
        render_template_as_native_obj=True,
        tags=["lora-deploy", f"model:{model.name}", *model.tags],
        default_args={"owner": "lora-deploy"},
        on_success_callback=slack_callback(model=model.name, conn_id=model.notify.slack_conn_id, success=True),
        on_failure_callback=slack_callback(model=model.name, conn_id=model.notify.slack_conn_id, success=False),
        doc_md=__doc__,
    ) as dag:
        source = model.source
        download = VastAIDownloadOperator(
            task_id="download", model=model.name, artifact_root=root, source_kind=source.kind,
            source_path=getattr(source, "path", None), ssh_conn_id=getattr(source, "ssh_conn_id", None),
            remote_dir=getattr(source, "remote_dir", None), checkpoint_glob=source.checkpoint_glob,
            instance_id=getattr(source, "instance_id", None),
            vastai_conn_id=getattr(source, "vastai_conn_id", "vastai_default"),
            vastai_api_url=getattr(source, "api_url", None), transfer=getattr(source, "transfer", "auto"),
            verify_host_key=getattr(source, "verify_host_key", True),
            adapter_version="{{ params.adapter_version or '' }}", force="{{ params.force }}",
            **stage_args(model, "download"),
        )
        merge = MergeOperator(
            task_id="merge", model=model.name, adapter=download.output, base_model=model.base_model,
            artifact_root=root, backend=model.merge.backend, dtype=model.merge.dtype,
            max_shard_mb=model.merge.max_shard_mb, force="{{ params.force }}", **stage_args(model, "merge"),
        )
        quantize = GGUFQuantizeOperator(
            task_id="quantize", model=model.name, merged=merge.output, quant_types="{{ params.quant_types }}",
            artifact_root=root, outtype=model.quantize.outtype, min_type_fraction=model.quantize.min_type_fraction,
            llama_cpp_dir=settings.llama_cpp_dir, force="{{ params.force }}", **stage_args(model, "quantize"),
        )
        install = LMStudioDeployOperator(
            task_id="install", model=model.name, ggufs=quantize.output, adapter=download.output,
            models_dir=model.lmstudio.models_dir, publisher=model.lmstudio.publisher, repo=model.lmstudio_repo,
            **stage_args(model, "install"),
        )
        health = HealthCheckSensor(
            task_id="health", model=model.name, installed=install.output, prompt=model.health.prompt,
            max_tokens=model.health.max_tokens, startup_timeout_s=model.health.startup_timeout_s,
            max_latency_s=model.health.max_latency_s, min_tokens_per_s=model.health.min_tokens_per_s,
            live_endpoint=model.lmstudio.endpoint, **stage_args(model, "health"),
        )
        hf = model.hf
        HFSpaceDeployOperator(
            task_id="publish", model=model.name, ggufs=quantize.output, adapter=download.output, health=health.output,
            repo_id=hf.repo_id if hf else None, space_id=hf.space_id if hf else None,
            private=hf.private if hf else True, hf_conn_id=hf.conn_id if hf else "huggingface_default",
            space_hardware=hf.space_hardware if hf else "cpu-basic", base_model=model.base_model,
            **stage_args(model, "publish"),
        )
    return dag


def invalid_model_dag(name: str, error: ConfigError) -> DAG:
    """A placeholder whose validation fails with ``error`` (so the DagBag reports it as an import error)."""
    dag_id = f"deploy_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
    dag = InvalidModelDAG(dag_id=dag_id, schedule=None, start_date=START_DATE, tags=["lora-deploy", "invalid-config"])
    dag.config_error = error
    return dag


def build_all() -> dict[str, DAG]:
    """Every model's DAG, valid or not, keyed by dag_id."""
    loaded = load_config()
    dags = {model.dag_id: build_deploy_dag(model, loaded.settings) for model in loaded.models.values()}
    for name, error in loaded.errors.items():
        dag = invalid_model_dag(name, error)
        dags[dag.dag_id] = dag
    return dags


globals().update(build_all())
