"""DeployPlanOperator: resolve the adapter, check connections, memory and disk, log the plan; stop early if asked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from airflow.providers.standard.utils.skipmixin import SkipMixin
from airflow.sdk import BaseOperator, Context

from include.config.sections import FidelitySettings, HFSettings, MergeSettings, QuantizeSettings, VastAISource
from include.errors import ConfigError
from include.gguf.quant_types import QUANT_TYPES
from include.plan import DeployPlan, check_targets, disk_check, estimate_outputs, require_space, same_filesystem
from include.plan.shapes import ModelShape
from include.source.download import select_checkpoint
from operators.common import SourceSettings, as_bool, engine_errors, section, source_section, workers_section
from operators.hooks.huggingface import TOKEN_ENV, HuggingFaceHook
from operators.hooks.training_box import TrainingBoxHook
from operators.hooks.vastai import API_KEY_ENV
from operators.operators.download import CheckpointSourceMixin, dated_selection

# Runs that nobody started by hand: when their adapter is already deployed they end at once.
UNATTENDED_RUN_TYPES = ("scheduled", "backfill", "asset_triggered")
# Ledger statuses of a version that was deployed (a failed or pruned one may be deployed again).
DEPLOYED_STATUSES = ("current", "installed", "retired")


class DeployPlanOperator(CheckpointSourceMixin, BaseOperator, SkipMixin):
    """The first task of a deploy run: decide what the run does before anything is written.

    It selects the adapter version (the run's ``adapter_version``; else the newest asset event's
    ``extra.adapter_version``; else, for scheduled and backfill runs, the newest checkpoint not newer than
    the data interval end; else the newest), checks the connections the run needs, estimates every output's
    size and the artifact root's high-water mark against free disk space, estimates each stage's peak memory
    against what this worker has (stages on ``workers.heavy_queue`` are checked by their own worker), reads the
    deployments ledger, and logs the plan. A stage or a disk that cannot fit fails the task (not retried). Then:

    * ``dry_run``: the plan is the result; every later task is skipped (nothing is written).
    * an unattended run (scheduled, backfill, asset) whose adapter is already deployed: skipped likewise,
      with one log line saying so, unless ``force``.
    * targets not asked for (``lmstudio``, ``huggingface``): their tasks are skipped.

    :param model: the model's name in config/models.yaml.
    :param artifact_root: root of the artifact store. (templated)
    :param source: the model's ``source`` section (or its ``model_dump()``).
    :param base_model: the base model directory or repo id.
    :param merge: the model's ``merge`` section (its dtype; ``fused``: nothing merged is written); None: defaults.
    :param quantize: the model's ``quantize`` section (the converter's ``outtype``); None: defaults.
    :param lmstudio_dir: LM Studio's models directory, or None when it is discovered at install time.
    :param hf: the model's ``hf`` section (or its ``model_dump()``), or None.
    :param fidelity: the model's ``fidelity`` section (the gate's memory); None: defaults.
    :param workers: the model's ``workers`` section (``heavy_queue``, ``memory_budget_mb``); None: defaults.
    :param slack_conn_id: the Slack webhook connection (a missing one is a warning, not an error).
    :param target_tasks: task ids per target, skipped when the run leaves the target out.
    :param adapter_version: a checkpoint name, or empty to select one. (templated)
    :param instance_id: a Vast.ai instance id overriding the configured one, or empty. (templated)
    :param quant_types: the llama.cpp types to produce. (templated)
    :param targets: ``lmstudio`` and/or ``huggingface``. (templated)
    :param force: deploy even if the adapter is already deployed (and redo cached stages). (templated)
    :param promote: the run asks to make its version current even if older. (templated)
    :param dry_run: plan only; skip every later task. (templated)

    Returns the plan record (:meth:`include.plan.DeployPlan.as_record`).
    """

    template_fields: Sequence[str] = ("artifact_root", "adapter_version", "instance_id", "quant_types", "targets",
                                      "force", "promote", "dry_run")
    ui_color = "#eceff1"

    def __init__(self, *, model: str, artifact_root: str, source: SourceSettings | Mapping[str, Any],
                 base_model: str, merge: MergeSettings | Mapping[str, Any] | None = None,
                 quantize: QuantizeSettings | Mapping[str, Any] | None = None, lmstudio_dir: str | None = None,
                 hf: HFSettings | Mapping[str, Any] | None = None, slack_conn_id: str | None = None,
                 fidelity: FidelitySettings | Mapping[str, Any] | None = None, workers: Any = None,
                 target_tasks: dict[str, list[str]] | None = None, adapter_version: Any = None,
                 instance_id: Any = None, quant_types: Any = (), targets: Any = ("lmstudio", "huggingface"),
                 force: Any = False, promote: Any = False, dry_run: Any = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.source = source_section(source, model=model)
        self.base_model = base_model
        self.merge = section(MergeSettings, merge, model=model, name="merge")
        self.quantize = section(QuantizeSettings, quantize, model=model, name="quantize")
        self.lmstudio_dir = lmstudio_dir
        self.hf = section(HFSettings, hf, model=model, name="hf") if hf is not None else None
        self.fidelity = section(FidelitySettings, fidelity, model=model, name="fidelity")
        self.workers = workers_section(workers, model=model)
        self.slack_conn_id = slack_conn_id
        self.target_tasks = target_tasks or {}
        self.adapter_version = adapter_version
        self.instance_id = instance_id
        self.quant_types = quant_types
        self.targets = targets
        self.force = force
        self.promote = promote
        self.dry_run = dry_run

    def execute(self, context: Context) -> dict[str, Any]:
        """Build and log the plan; skip what the run should not do."""
        with engine_errors(self.model):
            plan = self.build_plan(context)
        self.log.info("%s", plan.text())
        record = plan.as_record()
        skip, why = self._tasks_to_skip(plan, context)
        if skip:
            record["skipped"] = {"tasks": sorted(t.task_id for t in skip), "why": why}
            context["ti"].xcom_push(key="return_value", value=record)
            self.skip(ti=context["ti"], tasks=skip)
        return record

    def build_plan(self, context: Context) -> DeployPlan:
        """Select the checkpoint, check connections and space; nothing is written."""
        targets = check_targets(list(self.targets or ()), has_hf=bool(self.hf))
        quant_types = self._quant_types()
        self._check_connections(targets)
        event = self._newest_event(context)
        requested, selected_by = str(self.adapter_version or "").strip() or None, "conf"
        if not requested and event.get("adapter_version"):
            requested, selected_by = str(event["adapter_version"]), "asset event"
        instance_id = str(self.instance_id or "").strip() or str(event.get("instance_id") or "").strip() or None
        not_after = None if requested else dated_selection(context)
        if instance_id and isinstance(self.source, VastAISource):
            self.source = source_section({**self.source.model_dump(), "instance_id": instance_id}, model=self.model)
        with self.open_source() as source:
            checkpoint = select_checkpoint(source.list_checkpoints(), requested, where=source.description,
                                           not_after=not_after)
            where = source.description
        if not requested:
            selected_by = "data_interval_end" if not_after is not None else "newest"
        from include.merge.base_model import resolve_base_model
        from include.plan import model_shape
        from include.plan.fit import require_memory

        shape = model_shape(resolve_base_model(self.base_model))
        outputs = estimate_outputs(shape.parameters, shape.stored_bytes, self.merge_dtype, self.quantize.outtype,
                                   quant_types, shape=shape, output_type=self.quantize.output_tensor_type)
        current, deployed = self._ledger()
        plan = DeployPlan(
            model=self.model, version=checkpoint.name, adapter_time=_iso(checkpoint.mtime), selected_by=selected_by,
            source=where, base_model=self.base_model, parameters=shape.parameters,
            merge_dtype=self.merge_dtype, quant_types=quant_types, targets=targets, outputs=outputs,
            lmstudio_dir=self.lmstudio_dir, hf_repo=self.hf.repo_id if self.hf else None,
            hf_space=self.hf.space_id if self.hf else None, current_version=current,
            already_deployed=checkpoint.name in deployed, dry_run=as_bool(self.dry_run),
            promote=as_bool(self.promote),
            instance_id=self.source.instance_id if isinstance(self.source, VastAISource) else None)
        self._plan_resources(plan, shape, outputs, quant_types, targets)
        if self.hf is None and "huggingface" in list(self.targets or ()):
            plan.warnings.append("the model has no `hf` section: nothing is published")
        if not plan.dry_run:
            require_space(plan)
            require_memory(plan)
        return plan

    def _plan_resources(self, plan: DeployPlan, shape: ModelShape, outputs: list[dict[str, Any]],
                        quant_types: list[str], targets: list[str]) -> None:
        """Memory per stage against this worker, the artifact root's high-water mark, LM Studio's disk."""
        from include.plan.disk import high_water, imatrix_bytes
        from include.plan.fit import memory_entries, memory_warnings
        from include.plan.memory import goal_bytes
        from include.plan.stages import adapter_bound, run_estimates
        from include.resources.memory import worker_memory

        memory = worker_memory(self.workers.memory_budget_mb)
        estimates = run_estimates(shape, merge=self.merge, quantize=self.quantize, fidelity=self.fidelity,
                                  quant_types=quant_types, smoke="lmstudio" in targets)
        plan.memory = memory_entries(estimates, memory, self.workers.heavy_queue)
        plan.worker_memory = memory.as_record()
        plan.warnings += memory_warnings(plan)
        what, size = shape.largest_layer
        plan.largest_layer, plan.goal_bytes = {"name": what, "fp32_bytes": size}, goal_bytes(shape)
        parts = high_water(outputs, adapter_bytes=adapter_bound(shape),
                           imatrix=imatrix_bytes(shape) if self.quantize.imatrix.configured else 0)
        plan.disk.append(disk_check(Path(self.artifact_root), sum(parts.values()), parts))
        if "lmstudio" in targets and self.lmstudio_dir:
            quants = {o["name"]: o["bytes"] for o in outputs if o["name"] in quant_types}
            if same_filesystem(Path(self.lmstudio_dir), Path(self.artifact_root)):
                quants = {}  # installs are hard links into the artifact store
            plan.disk.append(disk_check(Path(self.lmstudio_dir), sum(quants.values()), quants))

    @property
    def merge_dtype(self) -> str:
        """The merge's output dtype for the estimates: ``fused`` writes no merged model, ``auto`` keeps the base's."""
        return "fused" if self.merge.backend == "fused" else self.merge.dtype

    def source_settings(self) -> SourceSettings:
        """The model's ``source`` section (with this run's Vast.ai instance, once the plan has chosen it)."""
        return self.source

    def _quant_types(self) -> list[str]:
        requested = self.quant_types if isinstance(self.quant_types, (list, tuple)) else [self.quant_types]
        types = [str(t).strip().upper() for t in requested if str(t).strip()]
        unknown = [t for t in types if t not in QUANT_TYPES]
        if unknown or not types:
            raise ConfigError(f"quant_types {unknown or types!r} are not llama.cpp quantization types",
                              fix=f"use names from {list(QUANT_TYPES)}")
        return list(dict.fromkeys(types))

    @staticmethod
    def _newest_event(context: Context) -> dict[str, Any]:
        """The ``extra`` of the newest triggering asset event (a training job's adapter_version, instance_id)."""
        newest = None
        for asset_events in (context.get("triggering_asset_events") or {}).values():
            for event in asset_events:
                if newest is None or event.timestamp > newest.timestamp:
                    newest = event
        return dict(getattr(newest, "extra", None) or {})

    def _check_connections(self, targets: list[str]) -> None:
        """Every connection the run needs exists (or its environment variable stands in); the hooks answer."""
        source = self.source
        missing: list[tuple[str, str, str | None]] = []  # (conn_id, config field, env var that may stand in)
        ssh_conn_id = getattr(source, "ssh_conn_id", None)
        if ssh_conn_id and not TrainingBoxHook.connection_exists(ssh_conn_id):
            missing.append((ssh_conn_id, "source.ssh_conn_id", None))
        if isinstance(source, VastAISource) and not self.vastai_hook.has_credentials():
            missing.append((source.vastai_conn_id, "source.vastai_conn_id", API_KEY_ENV))
        if "huggingface" in targets and self.hf and not HuggingFaceHook(self.hf.conn_id).has_credentials():
            missing.append((self.hf.conn_id, "hf.conn_id", TOKEN_ENV))
        if missing:
            conn_id, where, env = missing[0]
            raise ConfigError(f"connection {conn_id!r} (models.{self.model}.{where}) does not exist",
                              fix=f"create it in Admin > Connections or as AIRFLOW_CONN_{conn_id.upper()}"
                                  + (f", or set {env}" if env else ""))
        if self.slack_conn_id:
            from operators.hooks.slack import SlackNotifyHook

            if not SlackNotifyHook.connection_exists(self.slack_conn_id):
                self.log.warning("no Slack connection %r: this run's result will not be posted", self.slack_conn_id)

    def _ledger(self) -> tuple[str | None, set[str]]:
        """(current version, versions deployed before) from the model's deployments ledger, if any."""
        from include.errors import InstallError
        from include.lmstudio.ledger import read_ledger

        try:
            ledger = read_ledger(self.artifact_root, self.model)
        except InstallError as err:
            self.log.warning("%s: treating nothing as deployed", err)
            return None, set()
        deployed = {v for v, item in ledger["versions"].items() if item.get("status") in DEPLOYED_STATUSES}
        return ledger["current"], deployed

    def _tasks_to_skip(self, plan: DeployPlan, context: Context) -> tuple[list[Any], str]:
        """The downstream tasks this run leaves out, and why (for the log and the record's ``skipped``)."""
        task = context["task"]
        everything = [t for t in task.get_flat_relatives(upstream=False) if not t.is_teardown]
        if plan.dry_run:
            self.log.info("dry run: the plan above is all this run does")
            return everything, "dry run"
        run_type = str(getattr(getattr(context.get("dag_run"), "run_type", None), "value", ""))
        if plan.already_deployed and run_type in UNATTENDED_RUN_TYPES and not as_bool(self.force):
            self.log.info("adapter %s of %s is already deployed: nothing to do (trigger with force=true to deploy "
                          "it again)", plan.version, self.model)
            return everything, f"adapter {plan.version} is already deployed"
        left_out = {tid for target, ids in self.target_tasks.items() if target not in plan.targets for tid in ids}
        if left_out:
            self.log.info("targets %s: skipping %s", plan.targets, sorted(left_out))
        no_hf = " (the model has no `hf` section)" if self.hf is None else ""
        return [t for t in everything if t.task_id in left_out], f"targets {', '.join(plan.targets)} only{no_hf}"


def _iso(timestamp: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
