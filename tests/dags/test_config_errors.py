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


@pytest.mark.parametrize(("entry", "field", "fix"), [
    ("quantize: {types: [Q4_K_M, 'not a type']}", "models.bad.quantize.types", "correct `models.bad.quantize.types`"),
    ("lmstudio: {modelsdir: /x}", "models.bad.lmstudio.modelsdir", "remove `models.bad.lmstudio.modelsdir`"),
    ("schedule: 'every night'", "models.bad", "cron expression"),
    ("retry: {merge: {retries: -1}}", "models.bad.retry.merge.retries", "correct `models.bad.retry.merge.retries`"),
])
def test_one_bad_model_breaks_only_its_dag(tmp_path, monkeypatch, entry, field, fix):
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
    assert "model 'bad'" in message
    assert field in message
    assert "Fix:" in message and fix in message


def test_missing_source_names_the_field(tmp_path, monkeypatch):
    config = tmp_path / "models.yaml"
    config.write_text("models:" + GOOD + "  bad:\n    base_model: /m\n")
    bag = load_bag(monkeypatch, config)
    assert "deploy_good" in bag.dags
    assert "field 'models.bad.source'" in bag.import_errors[FILE]
    assert "add `models.bad.source`" in bag.import_errors[FILE]


def test_broken_yaml_is_one_clear_import_error(tmp_path, monkeypatch):
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  good: {base_model: [unclosed\n")
    bag = load_bag(monkeypatch, config)
    assert bag.dags == {}
    assert "is not valid YAML" in bag.import_errors[FILE]
    assert "Fix: correct the YAML syntax" in bag.import_errors[FILE]
