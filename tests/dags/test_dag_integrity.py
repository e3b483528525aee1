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
    order = [t.task_id for t in dag.topological_sort()]
    chain = ["plan", "download", "merge", "convert", "quant_types", "quantize", "ggufs", "install", "smoke",
             "promote", "health", "publish", "space_ready"]
    assert sorted(order) == sorted([*chain, "rollback", "retention"])
    assert [t for t in order if t in chain] == chain
    retention = dag.get_task("retention")  # a teardown after every leaf: it never decides the run's state
    assert retention.is_teardown and order[-1] == "retention"
    assert retention.upstream_task_ids == {"rollback", "space_ready"}
    assert dag.get_task("rollback").trigger_rule == "one_failed"
    assert dag.get_task("rollback").upstream_task_ids == {"promote", "health"}
    assert dag.get_task("publish").trigger_rule == "none_failed_min_one_success"
    assert dag.max_active_runs == 1


def test_schedule_is_the_cron_or_the_adapter_asset(example_bag):
    from airflow.sdk import AssetOrTimeSchedule

    timetable = example_bag.dags["deploy_majora"].timetable
    assert isinstance(timetable, AssetOrTimeSchedule)
    assert timetable.timetable.expression == "0 3 * * *"
    assert timetable.asset_condition.uri == "lora-deploy://majora/adapter"


def test_quantize_is_mapped_per_type_and_heavy_stages_share_a_queue_and_pool(monkeypatch, tmp_path):
    config = tmp_path / "models.yaml"
    text = (ROOT / "config" / "models.example.yaml").read_text()
    config.write_text(text.replace("models:\n", "models:\n", 1))
    import yaml

    raw = yaml.safe_load(text)
    raw["models"]["majora"]["workers"] = {"heavy_queue": "gpu", "heavy_pool": "heavy", "heavy_pool_slots": 2}
    raw["models"]["majora"].setdefault("quantize", {})["max_parallel"] = None
    config.write_text(yaml.safe_dump(raw))
    bag = load_bag(monkeypatch, config)
    dag = bag.dags["deploy_majora"]
    quantize = dag.get_task("quantize")
    assert type(quantize).__name__ == "MappedOperator"
    assert quantize.max_active_tis_per_dagrun is None  # quantize.max_parallel: null -> all types at once
    # By default one quantize at a time per run: llama-quantize already uses every core.
    assert load_bag(monkeypatch, ROOT / "config" / "models.example.yaml").dags["deploy_majora"].get_task(
        "quantize").max_active_tis_per_dagrun == 1
    for task_id in ("merge", "convert", "quantize"):
        task = dag.get_task(task_id)
        assert (task.queue, task.pool, task.pool_slots) == ("gpu", "heavy", 2), task_id
    assert dag.get_task("download").queue != "gpu"
    smoke = dag.get_task("smoke")  # loads the model into a server: in the pool, on the default queue
    assert (smoke.queue, smoke.pool, smoke.pool_slots) == ("default", "heavy", 2)


def test_each_model_gets_a_rollback_dag(example_bag):
    dag = example_bag.dags["rollback_majora"]
    assert [t.task_id for t in dag.topological_sort()] == ["promote", "health", "rollback"]
    assert dag.schedule is None
    assert dag.params.get_param("version").schema["type"] == "string"


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
    assert params["quant_types"] == ["Q4_K_M", "Q5_K_M", "Q8_0", "IQ4_XS"]  # quantize.types of the example
    assert params["adapter_version"] is None
    assert params["force"] is False and params["promote"] is False and params["dry_run"] is False
    assert params["targets"] == ["lmstudio", "huggingface"]
    schema = params.get_param("quant_types").schema
    assert "Q4_K_M" in schema["items"]["enum"] and "IQ4_XS" in schema["items"]["enum"]
    for name in ("adapter_version", "quant_types", "targets", "promote", "force", "dry_run"):
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, f"param {name} has no title/description"


@pytest.mark.parametrize("conf", [{"quant_types": ["Q9_X"]}, {"quant_types": []}, {"targets": ["ftp"]},
                                  {"adapter_version": "../etc"}, {"dry_run": "yes"}, {"instance_id": "abc"}])
def test_bad_conf_is_rejected_by_the_form_schema(example_bag, conf):
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(example_bag.dags["deploy_majora"].params)
    with pytest.raises(ParamValidationError):
        params.update(conf)
        params.validate()


def test_parsing_imports_nothing_heavy():
    code = textwrap.dedent(f"""
        import sys, runpy
        runpy.run_path({str(DAGS / FILE)!r})
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1:] in ([], [""]), f"{FILE} imports at parse time: {out.stdout}"
