"""Two DAGs per entry of config/models.yaml (or ``$LORA_DEPLOY_CONFIG``): ``deploy_<model>`` and ``rollback_<model>``.

``deploy_<model>``::

    plan -> download -> merge -> convert -> quantize[one per type] -> ggufs -> install -> smoke -> promote
         -> health -> publish -> space_ready                       (rollback runs when promote/health fail)
    -> retention (a teardown: frees the artifact store of what the ledger no longer keeps, however the run went)

Each task is a retried stage passing small JSON records through XCom; Slack hears about success and
failure. ``plan`` resolves the adapter version and stops dry runs and unattended runs whose adapter is
already deployed. ``ggufs`` announces ``lora-deploy://<model>/gguf``. The DAG runs on the model's cron OR
an event on ``lora-deploy://<model>/adapter`` (posted by training jobs).

``rollback_<model>`` makes an installed version current (Params: ``version``), health-checks it and
restores the previous one if it is not healthy.

A model whose entry is invalid gets no DAG but an import error of its own, naming the model, the field
and the fix; every other model's DAG still loads. Nothing heavy (torch, transformers, peft, llama_cpp)
is imported here: stages import what they need inside ``execute``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, AssetOrTimeSchedule, CronTriggerTimetable, Param

from include.config.loader import load_config
from include.config.model import ModelConfig, Settings
from include.errors import ConfigError
from include.gguf.quant_types import QUANT_TYPES
from operators.notifiers.slack import slack_callback
from operators.operators.download import VastAIDownloadOperator
from operators.operators.gguf import GGUFConvertOperator, GGUFQuantizeOperator, quant_types_of
from operators.operators.gguf_asset import GGUFCollectOperator, adapter_asset
from operators.operators.hf_space import HFSpaceDeployOperator
from operators.operators.lmstudio import LMStudioDeployOperator
from operators.operators.merge import MergeOperator
from operators.operators.plan import DeployPlanOperator
from operators.operators.promote import LMStudioPromoteOperator, LMStudioRollbackOperator
from operators.operators.retention import StoreRetentionOperator
from operators.sensors.health import HealthCheckSensor
from operators.sensors.hf_space import HFSpaceRuntimeSensor

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
    """The trigger form; Airflow checks a run's conf against these JSON schemas before the run is created."""
    targets = ["lmstudio", "huggingface"] if model.hf else ["lmstudio"]
    return {
        "adapter_version": Param(None, type=["null", "string"], pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 title="Adapter version",
                                 description="Checkpoint directory on the training box (e.g. checkpoint-300). Empty: "
                                             "the newest (for scheduled and backfill runs: the newest at the end "
                                             "of the run's data interval)."),
        "instance_id": Param(None, type=["null", "string"], pattern=r"^[0-9]+$", title="Vast.ai instance id",
                             description="Overrides source.instance_id for this run (Vast.ai sources only)."),
        "quant_types": Param(list(model.quantize.types), type="array", minItems=1, uniqueItems=True,
                             items={"type": "string", "enum": list(QUANT_TYPES)}, title="Quantization types",
                             description="llama.cpp types to produce, one mapped quantize task each."),
        "targets": Param(targets, type="array", minItems=1, uniqueItems=True,
                         items={"type": "string", "enum": ["lmstudio", "huggingface"]}, title="Targets",
                         description="Where this version goes: LM Studio on this machine, the Hugging Face repo "
                                     "and Space."),
        "promote": Param(False, type="boolean", title="Promote",
                         description="Make this version LM Studio's current one even if a newer adapter is "
                                     "current (a backfill never does that by itself)."),
        "force": Param(False, type="boolean", title="Force",
                       description="Redo every stage even if its output for the same inputs exists, and deploy "
                                   "an adapter that is already deployed."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Resolve the adapter, check connections and disk space, log the plan, "
                                     "write nothing."),
    }


def deploy_schedule(model: ModelConfig) -> Any:
    """The model's cron OR a new event on its adapter asset; just the asset when it has no cron."""
    if model.schedule is None:
        return [adapter_asset(model.name)]
    if model.schedule.startswith("@"):
        return AssetOrTimeSchedule(timetable=_preset_timetable(model.schedule), assets=adapter_asset(model.name))
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(model.schedule, timezone="UTC"),
                               assets=adapter_asset(model.name))


def _preset_timetable(preset: str) -> CronTriggerTimetable:
    crons = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
             "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}
    if preset not in crons:
        raise ConfigError(f"schedule {preset!r} is not a cron preset this project supports",
                          fix=f"use a cron expression or one of {sorted(crons)}")
    return CronTriggerTimetable(crons[preset], timezone="UTC")


def heavy_args(model: ModelConfig, *, queue: bool = True) -> dict[str, Any]:
    """Queue and pool of the heavy stages (merge, convert, quantize) from ``workers``.

    ``queue=False`` gives the pool alone: the smoke check loads the model into a llama.cpp server (memory
    like a heavy stage) but must run where the LM Studio models dir is.
    """
    args: dict[str, Any] = {}
    if queue and model.workers.heavy_queue:
        args["queue"] = model.workers.heavy_queue
    if model.workers.heavy_pool:
        args["pool"] = model.workers.heavy_pool
        args["pool_slots"] = model.workers.heavy_pool_slots
    return args


LMSTUDIO_TASKS = ["install", "smoke", "promote", "health", "rollback"]
HF_TASKS = ["publish", "space_ready"]


def build_deploy_dag(model: ModelConfig, settings: Settings) -> DAG:
    """The deploy DAG of one model."""
    root = settings.artifact_root
    force = "{{ params.force }}"
    health_settings = {"lmstudio": model.lmstudio, "health": model.health}  # the live check needs both
    with DAG(
        dag_id=model.dag_id,
        description=model.description or f"Deploy the LoRA adapter of {model.name}",
        schedule=deploy_schedule(model),
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
        plan = DeployPlanOperator(
            task_id="plan", model=model.name, artifact_root=root, source=source, base_model=model.base_model,
            merge=model.merge, quantize=model.quantize, lmstudio_dir=model.lmstudio.models_dir, hf=model.hf,
            slack_conn_id=model.notify.slack_conn_id, fidelity=model.fidelity, workers=model.workers,
            target_tasks={"lmstudio": LMSTUDIO_TASKS, "huggingface": HF_TASKS},
            adapter_version="{{ params.adapter_version or '' }}", instance_id="{{ params.instance_id or '' }}",
            quant_types="{{ params.quant_types }}", targets="{{ params.targets }}", force=force,
            promote="{{ params.promote }}", dry_run="{{ params.dry_run }}", **stage_args(model, "download"),
        )
        download = VastAIDownloadOperator(
            task_id="download", model=model.name, artifact_root=root, source_kind=source.kind,
            source_path=getattr(source, "path", None), ssh_conn_id=getattr(source, "ssh_conn_id", None),
            remote_dir=getattr(source, "remote_dir", None), checkpoint_glob=source.checkpoint_glob,
            instance_id="{{ ti.xcom_pull(task_ids='plan')['instance_id'] or '' }}",
            vastai_conn_id=getattr(source, "vastai_conn_id", None), vastai_api_url=getattr(source, "api_url", None),
            transfer=getattr(source, "transfer", None), verify_host_key=getattr(source, "verify_host_key", None),
            adapter_version="{{ ti.xcom_pull(task_ids='plan')['version'] }}",
            selected_by="{{ ti.xcom_pull(task_ids='plan')['selected_by'] }}", force=force,
            **stage_args(model, "download"),
        )
        plan >> download
        merge = MergeOperator(
            task_id="merge", model=model.name, adapter=download.output, base_model=model.base_model,
            artifact_root=root, backend=model.merge.backend, dtype=model.merge.dtype,
            max_shard_mb=model.merge.max_shard_mb, force=force, workers=model.workers, **stage_args(model, "merge"),
            **heavy_args(model),
        )
        toolchain = {"llama_cpp_dir": settings.llama_cpp_dir, "llama_cpp_bin_dir": settings.llama_cpp_bin_dir}
        convert = GGUFConvertOperator(
            task_id="convert", model=model.name, merged=merge.output, adapter=download.output,
            quant_types="{{ ti.xcom_pull(task_ids='plan')['quant_types'] }}", artifact_root=root,
            settings=model.quantize, fidelity=model.fidelity, force=force, **toolchain, **stage_args(model, "quantize"),
            workers=model.workers, **heavy_args(model),
        )
        quantize = GGUFQuantizeOperator.partial(
            task_id="quantize", model=model.name, converted=convert.output, artifact_root=root,
            # partial() arguments are serialized with the DAG: the sections go as JSON (the operator validates them)
            settings=model.quantize.model_dump(mode="json"), fidelity=model.fidelity.model_dump(mode="json"),
            workers=model.workers.model_dump(mode="json"), force=force, map_index_template="{{ task.quant_type }}",
            max_active_tis_per_dagrun=model.quantize.max_parallel,
            **toolchain, **stage_args(model, "quantize"), **heavy_args(model),
        ).expand(quant_type=quant_types_of(convert, **stage_args(model, "quantize")))
        ggufs = GGUFCollectOperator(task_id="ggufs", model=model.name, converted=convert.output,
                                    quantized=quantize.output, adapter=download.output, **stage_args(model, "quantize"))
        install = LMStudioDeployOperator(
            task_id="install", model=model.name, ggufs=ggufs.output, adapter=download.output, artifact_root=root,
            settings=model.lmstudio, **stage_args(model, "install"),
        )
        smoke = HealthCheckSensor(
            task_id="smoke", model=model.name, installed=install.output, phase="smoke", settings=health_settings,
            artifact_root=root, workers=model.workers, **stage_args(model, "health"), **heavy_args(model, queue=False),
        )
        promote = LMStudioPromoteOperator(
            task_id="promote", model=model.name, installed=install.output, artifact_root=root,
            settings=model.lmstudio, promote="{{ params.promote }}", **stage_args(model, "install"),
        )
        smoke >> promote
        health = HealthCheckSensor(
            task_id="health", model=model.name, installed=install.output, phase="live", settings=health_settings,
            artifact_root=root, promoted=promote.output,
            **stage_args(model, "health"),
        )
        rollback = LMStudioRollbackOperator(
            task_id="rollback", model=model.name, artifact_root=root, settings=model.lmstudio,
            promoted=promote.output, trigger_rule="one_failed", **stage_args(model, "install"),
        )
        health >> rollback
        publish = HFSpaceDeployOperator(
            task_id="publish", model=model.name, ggufs=ggufs.output, adapter=download.output, settings=model.hf,
            base_model=model.base_model, health=smoke.output, converted=convert.output,
            trigger_rule="none_failed_min_one_success", **stage_args(model, "publish"),
        )
        health >> publish
        HFSpaceRuntimeSensor(
            task_id="space_ready", model=model.name, published=publish.output, settings=model.hf,
            **stage_args(model, "publish"),
        )
        leaves = [task for task in dag.tasks if not task.downstream_list]
        leaves >> StoreRetentionOperator(  # a teardown: it runs however the run went, and never decides its state
            task_id="retention", model=model.name, artifact_root=root, settings=model.retention,
            keep_versions=model.lmstudio.keep_versions, plan="{{ ti.xcom_pull(task_ids='plan') }}",
            installed="{{ ti.xcom_pull(task_ids='install') }}", published="{{ ti.xcom_pull(task_ids='publish') }}",
            dry_run="{{ params.dry_run }}", **stage_args(model, "default"),
        ).as_teardown()
    return dag


def build_rollback_dag(model: ModelConfig, settings: Settings) -> DAG:
    """``rollback_<model>``: make an installed version LM Studio's current one, health-check it, undo on failure."""
    root = settings.artifact_root
    with DAG(
        dag_id=f"rollback_{model.name}",
        description=f"Make an installed version of {model.name} current in LM Studio (rollback or promote)",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        params={"version": Param(type="string", minLength=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                 title="Version", description="An installed adapter version (see the Deployments "
                                                              "page or the ledger), e.g. checkpoint-200.")},
        render_template_as_native_obj=True,
        tags=["lora-deploy", f"model:{model.name}", "rollback", *model.tags],
        default_args={"owner": "lora-deploy"},
        on_success_callback=slack_callback(model=model.name, conn_id=model.notify.slack_conn_id, success=True),
        on_failure_callback=slack_callback(model=model.name, conn_id=model.notify.slack_conn_id, success=False),
    ) as dag:
        promote = LMStudioPromoteOperator(
            task_id="promote", model=model.name, artifact_root=root, settings=model.lmstudio,
            version="{{ params.version }}", promote=True, **stage_args(model, "install"),
        )
        health = HealthCheckSensor(
            task_id="health", model=model.name, installed=promote.output, phase="live", promoted=promote.output,
            settings={"lmstudio": model.lmstudio, "health": model.health}, artifact_root=root,
            **stage_args(model, "health"),
        )
        rollback = LMStudioRollbackOperator(
            task_id="rollback", model=model.name, artifact_root=root, settings=model.lmstudio,
            promoted=promote.output, trigger_rule="one_failed", **stage_args(model, "install"),
        )
        health >> rollback
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
    dags: dict[str, DAG] = {}
    for model in loaded.models.values():
        for dag in (build_deploy_dag(model, loaded.settings), build_rollback_dag(model, loaded.settings)):
            dags[dag.dag_id] = dag
    for name, error in loaded.errors.items():
        dag = invalid_model_dag(name, error)
        dags[dag.dag_id] = dag
    return dags


globals().update(build_all())
