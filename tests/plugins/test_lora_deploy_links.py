"""The plugin ``plugins/lora_deploy_links.py`` loads through Airflow's plugins manager and its links survive DAG
serialization (what the API server uses to show the buttons)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def plugins_manager(monkeypatch: pytest.MonkeyPatch):
    """Airflow's plugins manager reading this project's plugins folder (fresh cache, restored after)."""
    from airflow import plugins_manager, settings

    caches = (plugins_manager._get_plugins, plugins_manager._get_extra_operators_links_plugins)
    monkeypatch.setattr(settings, "PLUGINS_FOLDER", str(ROOT / "plugins"))
    for cached in caches:
        cached.cache_clear()
    yield plugins_manager
    for cached in caches:
        cached.cache_clear()


def test_plugin_loads_and_registers_both_links(plugins_manager):
    from operators.links.huggingface import HFModelRepoLink, HFSpaceLink

    names = {info["name"] for info in plugins_manager.get_plugin_info()}
    errors = {path: err for path, err in plugins_manager.get_import_errors().items() if "lora_deploy" in path}

    assert "lora_deploy_links" in names and errors == {}
    links = plugins_manager.get_operator_extra_links()
    assert {type(link) for link in links} >= {HFModelRepoLink, HFSpaceLink}


def test_links_survive_serialization_of_a_dag(plugins_manager):
    from airflow.sdk import DAG
    from airflow.serialization.serialized_objects import DagSerialization

    from operators.operators.hf_space import HFSpaceDeployOperator
    from operators.sensors.hf_space import HFSpaceRuntimeSensor

    with DAG("links_roundtrip", schedule=None) as dag:
        publish = HFSpaceDeployOperator(task_id="publish", model="m", ggufs=[], adapter={}, settings=None)
        HFSpaceRuntimeSensor(task_id="space_ready", model="m", published=publish.output, settings=None)

    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))

    assert set(restored.get_task("publish").extra_links) == {"Hugging Face model", "Hugging Face Space"}
    assert set(restored.get_task("space_ready").extra_links) == {"Hugging Face Space"}


def test_links_only_accept_http_urls_from_the_record():
    from operators.links import huggingface as links

    assert links._https("https://huggingface.co/acme/m") == "https://huggingface.co/acme/m"
    assert links._https("javascript:alert(1)") == "" and links._https(None) == ""
