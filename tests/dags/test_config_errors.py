"""One invalid model entry breaks only that model's DAG, with a message naming the model, field and fix."""

from __future__ import annotations

import textwrap

import pytest

from tests.dags.test_dag_integrity import FILE, load_bag

GOOD = """
  good:
    base_model: /models/base
    source: {kind: local, path: /data/good}
"""


@pytest.mark.parametrize(("entry", "field", "problem", "fix"), [
    ("quantize: {types: [Q4_K_M, 'not a type']}", "field 'models.bad.quantize.types'",
     "'NOT A TYPE' is not a llama.cpp quantization type name", "correct `models.bad.quantize.types`"),
    ("lmstudio: {modelsdir: /x}", "field 'models.bad.lmstudio.modelsdir'", "Extra inputs are not permitted (got '/x')",
     "remove `models.bad.lmstudio.modelsdir`"),
    ("schedule: 'every night'", "field 'models.bad.schedule'", "schedule 'every night' is not a valid cron expression",
     "correct `models.bad.schedule`"),
    ("retry: {merge: {retries: -1}}", "field 'models.bad.retry.merge.retries'",
     "Input should be greater than or equal to 0 (got -1)", "correct `models.bad.retry.merge.retries`"),
])
def test_one_bad_model_breaks_only_its_dag(tmp_path, monkeypatch, entry, field, problem, fix):
    config = tmp_path / "models.yaml"
    config.write_text("models:" + GOOD + textwrap.dedent(f"""
      bad:
        base_model: /models/base
        source: {{kind: local, path: /data/bad}}
        {entry}
    """).replace("\n", "\n  ", ).replace("\n  bad:", "\n  bad:"))
    bag = load_bag(monkeypatch, config)
    assert "deploy_good" in bag.dags
    assert "deploy_bad" not in bag.dags
    assert list(bag.import_errors) == [FILE]
    message = bag.import_errors[FILE]
    assert message.startswith("ConfigError: model 'bad': "), message
    said, _, fix_part = message.partition(". Fix: ")
    assert field in said and problem in said, message
    assert fix_part.startswith(fix), message


def test_missing_source_names_the_field(tmp_path, monkeypatch):
    config = tmp_path / "models.yaml"
    config.write_text("models:" + GOOD + "  bad:\n    base_model: /m\n")
    bag = load_bag(monkeypatch, config)
    assert "deploy_good" in bag.dags and "deploy_bad" not in bag.dags
    message = bag.import_errors[FILE]
    assert message.startswith("ConfigError: model 'bad': field 'models.bad.source': Field required"), message
    assert message.endswith("Fix: add `models.bad.source`"), message


def test_broken_yaml_is_one_clear_import_error(tmp_path, monkeypatch):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  good: {base_model: [unclosed\n")
    bag = load_bag(monkeypatch, config)
    assert bag.dags == {} and list(bag.import_errors) == [FILE]
    message = bag.import_errors[FILE]
    assert f"ConfigError: {config} is not valid YAML: while parsing a flow sequence" in message, message
    assert "line 3, column 1. Fix: correct the YAML syntax at the line shown" in message, message
