"""LMStudioPromoteOperator (task ``promote``, also the rollback_<model> DAG) and LMStudioRollbackOperator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from include.config.sections import LMStudioSettings
from operators.common import as_bool, engine_errors, section
from operators.operators.lmstudio import run_id_of


class LMStudioPromoteOperator(BaseOperator):
    """Make an installed version current: the stable ``<model>-<quant>.gguf`` files, ``lms load`` and the ledger.

    The version comes from ``installed`` (the install task's record) or ``version`` (a version in the ledger;
    unknown -> an error listing the installed ones). It becomes current only when its adapter time is newer
    than the current version's, or ``promote`` is true; otherwise the task logs why and returns
    ``promoted: False`` (a backfill never replaces a newer model).

    :param model: the model's name. :param artifact_root: where the ledger lives. (templated)
    :param settings: the model's ``lmstudio`` section (or its ``model_dump()``).
    :param installed: the install task's record. (templated) :param version: a version to promote. (templated)
    :param promote: force promotion (``"{{ params.promote }}"``). (templated)

    Returns ``{"promoted", "version", "previous", "reason", "identifier", "lms": [argv, ...], "models_dir",
    "installed": [{"quant", "path", "identifier", "bytes", "sha256", "linked"}]}`` - so the record also serves as
    the ``installed`` input of the live health check in the rollback_<model> DAG.
    """

    template_fields: Sequence[str] = ("installed", "promote", "version", "artifact_root")
    ui_color = "#fff3e0"

    def __init__(self, *, model: str, artifact_root: str, settings: LMStudioSettings | Mapping[str, Any],
                 installed: Any = None, version: Any = None, promote: Any = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.settings = section(LMStudioSettings, settings, model=model, name="lmstudio")
        self.installed = installed
        self.version = version
        self.promote = promote

    def execute(self, context: Context) -> dict[str, Any]:
        """Promote (or explain why not) and return the record."""
        from include.errors import InstallError
        from include.lmstudio.deploy import promote

        with engine_errors(self.model):
            version = self.version or (self.installed or {}).get("version")
            if not version or str(version).strip() in ("", "None"):
                raise InstallError("no version to promote: neither 'installed' nor 'version' names one",
                                   fix="pass the install task's output, or the version param of rollback_<model>")
            record = promote(model=self.model, settings=self.settings.model_dump(),
                             artifact_root=str(self.artifact_root), version=str(version).strip(),
                             force=as_bool(self.promote), run_id=run_id_of(context))
        if record["promoted"]:
            self.log.info("%s %s is current (was %s); %s", self.model, record["version"], record["previous"],
                          "lms: " + "; ".join(" ".join(a[1:]) for a in record["lms"]) if record["lms"]
                          else "lms not on PATH: not loaded")
        else:
            self.log.info("%s %s NOT promoted: %s", self.model, record["version"], record["reason"])
        return record


class LMStudioRollbackOperator(BaseOperator):
    """Restore the previous version when this run's version was made current and then failed (task ``rollback``).

    Runs with ``trigger_rule="one_failed"`` after ``promote`` and ``health``. Restores the previous version's
    stable files byte for byte, reloads it with ``lms``, records a ``rollback`` event, pushes
    ``{"failed_version", "restored_version", "reason"}`` under XCom key ``rollback`` and fails the task so the
    run ends failed. With nothing promoted (an earlier stage failed) it pushes ``restored_version: None`` and
    fails too ("nothing to roll back"): as a leaf it carries the failure to the run's state. The record also
    lists ``failed_stages`` (the run's failed tasks), which the Slack message names.

    :param model: the model's name. :param settings: the model's ``lmstudio`` section (or its ``model_dump()``).
    :param artifact_root: where the ledger lives. (templated)
    :param promoted: the promote task's record (None when promote never finished: the ledger is read). (templated)
    """

    template_fields: Sequence[str] = ("promoted", "artifact_root")
    ui_color = "#ffebee"

    def __init__(self, *, model: str, artifact_root: str, settings: LMStudioSettings | Mapping[str, Any],
                 promoted: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "one_failed")
        kwargs.setdefault("retries", 0)
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.settings = section(LMStudioSettings, settings, model=model, name="lmstudio")
        self.promoted = promoted

    def execute(self, context: Context) -> None:
        """Roll back (or find nothing to roll back), push the record and fail."""
        from include.lmstudio.deploy import failure_reason, promoted_in_run, rollback

        run_id = run_id_of(context)
        root = str(self.artifact_root)
        promoted = self.promoted if isinstance(self.promoted, dict) else None
        if promoted is not None:
            failed = promoted.get("version") if promoted.get("promoted") else None
        else:
            failed = promoted_in_run(root, self.model, run_id)
        stages = self._failed_stages(context)
        reason = failure_reason(root, self.model, failed, run_id) or (
            f"stage(s) {', '.join(stages)} failed" if stages else "health check failed")
        with engine_errors(self.model):
            record = rollback(model=self.model, settings=self.settings.model_dump(), artifact_root=root,
                              failed_version=failed,
                              reason=reason, run_id=run_id)
        summary = {**{k: record[k] for k in ("failed_version", "restored_version", "reason")},
                   "failed_stages": stages}
        context["ti"].xcom_push(key="rollback", value=summary)
        if not record["rolled_back"]:
            # This task is a leaf: failing here is what fails the run when the failed stage's other
            # descendants were skipped (e.g. publish/space_ready for a model without an `hf` section).
            raise AirflowFailException(f"model {self.model!r}: {reason}; nothing to roll back (no version was made "
                                       f"current by this run), the current LM Studio model is unchanged")
        restored = record["restored_version"] or "nothing (no previous version; the model was unloaded)"
        raise AirflowFailException(f"model {self.model!r}: rolled back {record['failed_version']} -> {restored} "
                                   f"because: {reason}")

    def _failed_stages(self, context: Context) -> list[str]:
        """The task ids of this run that failed (asked of the API server; empty where it cannot be asked)."""
        ti = context.get("ti")
        try:
            states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])  # type: ignore[union-attr]
        except Exception as err:  # dag.test has no API server to ask: not fatal
            self.log.info("could not list the run's failed tasks: %s", err)
            return []
        run_states = states.get(ti.run_id, {}) if isinstance(states, dict) else {}  # type: ignore[union-attr]
        return sorted(str(task) for task, state in run_states.items() if str(state).lower().endswith("failed")
                      and not str(state).lower().endswith("upstream_failed"))

