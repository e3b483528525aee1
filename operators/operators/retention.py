"""StoreRetentionOperator: the end of ``deploy_<model>``: apply the retention policy to the artifact store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from operators.common import as_bool, engine_errors, section


def delivered(plan: Any, installed: Any, published: Any) -> bool:
    """True when the run delivered its version to every target it had (or built nothing: no plan, dry run).

    ``lmstudio`` is delivered when ``install`` returned a record, ``huggingface`` when ``publish`` did.
    """
    if not isinstance(plan, dict) or plan.get("dry_run"):
        return True
    done = {"lmstudio": isinstance(installed, dict), "huggingface": isinstance(published, dict)}
    return all(done.get(target, False) for target in plan.get("targets") or [])


class StoreRetentionOperator(BaseOperator):
    """Free the artifact store of what the ledger no longer keeps; log and return what was freed.

    Kept: the entries of the versions the LM Studio ledger keeps (current, previous and the newest
    ``keep_versions``): quant GGUFs, adapter, fidelity figures, and with ``retention.keep_intermediates`` the f16
    GGUF, merged model and imatrix; plus whatever another run used within ``retention.lease_hours``. When this run
    delivered its version (installed and published to its targets), its own in-use marks are released first, so
    its intermediates go now; a run that failed keeps them for ``lease_hours`` (a cleared task can still resume).
    See :mod:`include.store.retention`.

    Meant as the DAG's teardown: it runs however the run went, and its own state never decides the run's.

    :param model: the model's name in config/models.yaml.
    :param artifact_root: root of the artifact store. (templated)
    :param settings: the model's ``retention`` section (or its ``model_dump()``; left-out keys take its defaults).
    :param keep_versions: ``lmstudio.keep_versions``: how many versions the ledger keeps installed.
    :param plan: the plan task's record (its ``targets``), or None. (templated)
    :param installed: the install task's record, or None when it did not succeed. (templated)
    :param published: the publish task's record, or None when it did not succeed. (templated)
    :param dry_run: report only, change nothing. (templated)

    Returns ``{"model", "dry_run", "released", "released_leases", "freed_bytes", "removed_bytes", "removed_count",
    "kept_bytes", "kept_count", "removed": [{"path", "bytes", "reason"}, ...], "lmstudio_pruned": [versions]}``.
    Installed LM Studio versions beyond ``keep_versions`` (install prunes before the promote) are pruned first, so
    LM Studio and the store keep the same versions.
    """

    template_fields: Sequence[str] = ("artifact_root", "plan", "installed", "published", "dry_run")
    ui_color = "#eceff1"

    def __init__(self, *, model: str, artifact_root: str, settings: Any, keep_versions: int,
                 plan: Any = None, installed: Any = None, published: Any = None, dry_run: Any = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.artifact_root = artifact_root
        self.settings = settings
        self.keep_versions = keep_versions
        self.plan = plan
        self.installed = installed
        self.published = published
        self.dry_run = dry_run

    def execute(self, context: Context) -> dict[str, Any]:
        """Read what the ledger keeps, release this run's marks when it delivered, collect the rest."""
        from include.config.sections import RetentionSettings
        from include.lmstudio.deploy import prune
        from include.lmstudio.ledger import installed_versions, read_ledger
        from include.lmstudio.models_tree import versions_to_prune
        from include.store.leases import holder_of
        from include.store.retention import Keep, Policy, apply_retention

        with engine_errors(self.model):
            settings = section(RetentionSettings, self.settings, model=self.model, name="retention")
            dry_run = as_bool(self.dry_run) or not settings.enabled
            # Install pruned before this run's promote: LM Studio may hold one version more than it keeps now.
            lmstudio_pruned = prune(model=self.model, artifact_root=self.artifact_root,
                                    keep_versions=int(self.keep_versions), run_id=context["run_id"], dry_run=dry_run)
            ledger = read_ledger(self.artifact_root, self.model)
            pruned = set(versions_to_prune(ledger, int(self.keep_versions)))
            keep = Keep({v: {f["sha256"] for f in ledger["versions"][v].get("files", [])}
                         for v in installed_versions(ledger) if v not in pruned})
            finished = delivered(self.plan, self.installed, self.published)
            holder = holder_of(context["dag"].dag_id, context["run_id"])
            self.log.info("kept versions: %s; this run %s", sorted(keep.versions) or "none",
                          "delivered its version: releasing what it used" if finished else
                          f"did not deliver: what it used stays for {settings.lease_hours:g} h")
            report = apply_retention(self.artifact_root, self.model, keep,
                                     Policy(keep_intermediates=settings.keep_intermediates,
                                            lease_s=settings.lease_hours * 3600),
                                     release=holder if finished else None, dry_run=dry_run)
        return {**report.record(), "lmstudio_pruned": [item["version"] for item in lmstudio_pruned]}
