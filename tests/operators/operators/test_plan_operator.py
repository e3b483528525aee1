"""The plan task's decisions: which runs end at the plan, and which targets' tasks are skipped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from include.plan import DeployPlan
from tests.conftest import ROOT
from tests.dags.test_dag_integrity import load_bag


@pytest.fixture
def plan_task(monkeypatch):
    return load_bag(monkeypatch, ROOT / "config" / "models.example.yaml").dags["deploy_majora"].get_task("plan")


def plan(**fields) -> DeployPlan:
    base = {"model": "majora", "version": "checkpoint-300", "adapter_time": "t", "selected_by": "newest",
            "source": "box", "base_model": "b", "parameters": 1, "merge_dtype": "auto", "quant_types": ["Q8_0"],
            "targets": ["lmstudio", "huggingface"]}
    return DeployPlan(**{**base, **fields})


def context(task, run_type: str) -> dict:
    return {"task": task, "dag_run": SimpleNamespace(run_type=SimpleNamespace(value=run_type))}


@pytest.mark.parametrize("run_type", ["scheduled", "backfill", "asset_triggered"])
def test_unattended_runs_of_a_deployed_adapter_end_at_the_plan(plan_task, run_type):
    skipped, why = plan_task._tasks_to_skip(plan(already_deployed=True), context(plan_task, run_type))
    assert {t.task_id for t in skipped} == set(plan_task.dag.task_ids) - {"plan", "retention"}  # a teardown runs
    assert why == f"adapter {plan().version} is already deployed"


def test_force_and_manual_runs_deploy_again(plan_task):
    assert plan_task._tasks_to_skip(plan(already_deployed=True), context(plan_task, "manual"))[0] == []
    plan_task.force = True
    assert plan_task._tasks_to_skip(plan(already_deployed=True), context(plan_task, "scheduled"))[0] == []


def test_dry_run_skips_everything_and_targets_skip_their_tasks(plan_task):
    everything = set(plan_task.dag.task_ids) - {"plan", "retention"}  # the retention teardown always runs
    dry, why = plan_task._tasks_to_skip(plan(dry_run=True), context(plan_task, "manual"))
    assert {t.task_id for t in dry} == everything and why == "dry run"
    only_hub, why = plan_task._tasks_to_skip(plan(targets=["huggingface"]), context(plan_task, "manual"))
    assert {t.task_id for t in only_hub} == {"install", "smoke", "promote", "health", "rollback"}
    assert why.startswith("targets huggingface only")
    only_lmstudio, _ = plan_task._tasks_to_skip(plan(targets=["lmstudio"]), context(plan_task, "manual"))
    assert {t.task_id for t in only_lmstudio} == {"publish", "space_ready"}
