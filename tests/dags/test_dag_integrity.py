"""The DAG file: loads without errors, every DAG and task is configured as the project promises."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT

DAGS = ROOT / "dags"
FILE = "deploy_models.py"
HEAVY = ("torch", "transformers", "peft", "llama_cpp", "safetensors", "numpy")


def load_bag(monkeypatch: pytest.MonkeyPatch, config: Path | None = None):
    """Parse the dags folder the way the dag-processor does (optionally with another config file)."""
    from airflow.dag_processing.dagbag import BundleDagBag

    if config is not None:
        monkeypatch.setenv("LORA_DEPLOY_CONFIG", str(config))
    return BundleDagBag(dag_folder=str(DAGS), bundle_path=DAGS, bundle_name="dags-folder")


def test_default_config_loads_without_import_errors(monkeypatch):
    bag = load_bag(monkeypatch)
    assert bag.import_errors == {}, f"{FILE}: {bag.import_errors}"
    assert "deploy_demo" in bag.dags


@pytest.fixture
def example_bag(monkeypatch):
    return load_bag(monkeypatch, ROOT / "config" / "models.example.yaml")


def test_example_config_builds_every_stage(example_bag):
    assert example_bag.import_errors == {}, f"{FILE}: {example_bag.import_errors}"
    dag = example_bag.dags["deploy_majora"]
    assert [t.task_id for t in dag.topological_sort()] == [
        "download", "merge", "quantize", "install", "health", "publish"]
    assert dag.max_active_runs == 1
    assert dag.schedule == "0 3 * * *"


def test_every_dag_has_tags_and_every_task_retries(example_bag):
    for dag_id, dag in example_bag.dags.items():
        assert "lora-deploy" in dag.tags, f"{dag_id} ({FILE}) has no lora-deploy tag"
        assert dag.on_success_callback and dag.on_failure_callback, f"{dag_id} ({FILE}) has no Slack callbacks"
        for task in dag.tasks:
            assert task.retries >= 1, f"{dag_id}.{task.task_id} ({FILE}) has no retries"


def test_retry_policy_comes_from_config_per_stage(example_bag):
    dag = example_bag.dags["deploy_majora"]
    download, merge = dag.get_task("download"), dag.get_task("merge")
    assert download.retries == 5  # defaults.retry.download
    assert merge.retries == 2  # defaults.retry.default
    assert merge.retry_delay.total_seconds() == 30
    assert merge.retry_exponential_backoff == 2.0
    assert merge.max_retry_delay.total_seconds() == 600


def test_params_form(example_bag):
    params = example_bag.dags["deploy_majora"].params
    assert params["quant_types"] == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    assert params["adapter_version"] is None
    assert params["force"] is False


def test_parsing_imports_nothing_heavy():
    code = textwrap.dedent(f"""
        import sys, runpy
        runpy.run_path({str(DAGS / FILE)!r})
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), f"{FILE} imports at parse time: {out.stdout}"
