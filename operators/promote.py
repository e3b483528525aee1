"""LMStudioPromoteOperator (task ``promote``, also the rollback_<model> DAG) and LMStudioRollbackOperator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from operators._engine import as_bool, engine_errors
from operators.lmstudio import run_id_of


class LMStudioPromoteOperator(BaseOperator):
    """Make an installed version current: the stable ``<model>-<quant>.gguf`` files, ``lms load`` and the ledger.

    The version comes from ``installed`` (the install task's record) or ``version`` (a version in the ledger;
    unknown -> an error listing the installed ones). It becomes current only when its adapter time is newer
    than the current version's, or ``promote`` is true; otherwise the task logs why and returns
    ``promoted: False`` (a backfill never replaces a newer model).

    :param model: the model's name. :param artifact_root: where the ledger lives. (templated)
    :param settings: ``ModelConfig.lmstudio.model_dump(mode="json")``.
    :param installed: the install task's record. (templated) :param version: a version to promote. (templated)
    :param promote: force promotion (``"{{ params.promote }}"``). (templated)

    Returns ``{"promoted", "version", "previous", "reason", "identifier", "lms": [argv, ...], "models_dir",
    "installed": [{"quant", "path", "identifier", "bytes", "sha256", "linked"}]}`` - so the record also serves as
    the ``installed`` input of the live health check in the rollback_<model> DAG.
    """

    template_fields: Sequence[str] = ("installed", "promote", "version", "artifact_root")
    ui_color = "#fff3e0"

    def __init__(self, *, model: str, artifact_root: str, settings: dict[str, Any], installed: Any = None,
                 version: Any = None, promote: Any = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.settings = dict(settings)
        self.installed = installed
        self.version = version
        self.promote = promote

    def execute(self, context: Context) -> dict[str, Any]:
        """Promote (or explain why not) and return the record."""
        from include.errors import InstallError
        from include.lmstudio_deploy import promote

        with engine_errors(self.model):
            version = self.version or (self.installed or {}).get("version")
            if not version or str(version).strip() in ("", "None"):
                raise InstallError("no version to promote: neither 'installed' nor 'version' names one",
                                   fix="pass the install task's output, or the version param of rollback_<model>")
            record = promote(model=self.model, settings=self.settings, artifact_root=str(self.artifact_root),
                             version=str(version).strip(), force=as_bool(self.promote), run_id=run_id_of(context))
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
    run ends failed. With nothing promoted (an earlier stage failed) it pushes ``restored_version: None`` and is
    skipped ("nothing to roll back"): the run fails through the stage that failed.

    :param model: the model's name. :param settings: ``ModelConfig.lmstudio.model_dump(mode="json")``.
    :param artifact_root: where the ledger lives. (templated)
    :param promoted: the promote task's record (None when promote never finished: the ledger is read). (templated)
    """

    template_fields: Sequence[str] = ("promoted", "artifact_root")
    ui_color = "#ffebee"

    def __init__(self, *, model: str, artifact_root: str, settings: dict[str, Any], promoted: Any = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("trigger_rule", "one_failed")
        kwargs.setdefault("retries", 0)
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.settings = dict(settings)
        self.promoted = promoted

    def execute(self, context: Context) -> None:
        """Roll back (or find nothing to roll back), push the record and fail."""
        from include.lmstudio_deploy import failure_reason, promoted_in_run, rollback

        run_id = run_id_of(context)
        root = str(self.artifact_root)
        promoted = self.promoted if isinstance(self.promoted, dict) else None
        if promoted is not None:
            failed = promoted.get("version") if promoted.get("promoted") else None
        else:
            failed = promoted_in_run(root, self.model, run_id)
        reason = failure_reason(root, self.model, failed, run_id) or "health check failed"
        with engine_errors(self.model):
            record = rollback(model=self.model, settings=self.settings, artifact_root=root, failed_version=failed,
                              reason=reason, run_id=run_id)
        summary = {k: record[k] for k in ("failed_version", "restored_version", "reason")}
        context["ti"].xcom_push(key="rollback", value=summary)
        if not record["rolled_back"]:
            # An earlier stage failed before anything was made current: the run fails through that stage.
            raise AirflowSkipException(f"model {self.model!r}: nothing to roll back (no version was made current "
                                       f"by this run); the current LM Studio model is unchanged")
        restored = record["restored_version"] or "nothing (no previous version; the model was unloaded)"
        raise AirflowFailException(f"model {self.model!r}: rolled back {record['failed_version']} -> {restored} "
                                   f"because: {reason}")
