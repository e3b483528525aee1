"""config/models.yaml loading: env expansion, defaults, per-model errors, file-level errors."""

from __future__ import annotations

import pytest
import yaml

from include.config.loader import load_config, validate_model
from include.errors import ConfigError

MINIMAL = {"base_model": "/m", "source": {"kind": "local", "path": "/data"}}


def test_defaults_are_merged_under_each_model(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "defaults:\n  quantize: {types: [Q5_K_M]}\n  retry: {default: {retries: 7}}\n"
        "models:\n  a: {base_model: /m, source: {kind: local, path: /d}}\n"
        "  b: {base_model: /m, source: {kind: local, path: /d}, quantize: {types: [q8_0]}}\n")
    loaded = load_config(path)
    assert loaded.errors == {}
    assert loaded.models["a"].quantize.types == ["Q5_K_M"]
    assert loaded.models["b"].quantize.types == ["Q8_0"]
    assert loaded.models["a"].retry.for_stage("merge").retries == 7
    assert loaded.models["a"].retry.for_stage("download").retries == 5


def test_env_variables_and_home_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("BOX", str(tmp_path))
    model = validate_model("m", {**MINIMAL, "source": {"kind": "local", "path": "${BOX}/ckpt"},
                                 "lmstudio": {"models_dir": "${UNSET_VAR:-~/lm}"}})
    assert model.source.path == f"{tmp_path}/ckpt"
    assert model.lmstudio.models_dir.endswith("/lm") and "~" not in model.lmstudio.models_dir


def test_unset_variable_names_model_field_and_fix():
    with pytest.raises(ConfigError) as err:
        validate_model("m", {**MINIMAL, "base_model": "${SURELY_NOT_SET_123}/base"})
    assert "model 'm'" in str(err.value)
    assert "models.m.base_model" in str(err.value)
    assert "export SURELY_NOT_SET_123" in str(err.value)


def test_unknown_source_kind_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        validate_model("m", {**MINIMAL, "source": {"kind": "ftp"}})
    assert "'local', 'ssh'" in str(err.value)


def test_ssh_remote_dir_must_be_absolute():
    with pytest.raises(ConfigError, match="absolute path"):
        validate_model("m", {**MINIMAL, "source": {"kind": "ssh", "ssh_conn_id": "box", "remote_dir": "out"}})


def test_model_names_become_dag_ids():
    assert validate_model("majora-7b", MINIMAL).dag_id == "deploy_majora-7b"
    with pytest.raises(ConfigError, match="lowercase"):
        validate_model("Majora 7B", MINIMAL)


@pytest.mark.parametrize(("text", "message"), [
    ("models: [a, b]\n", "'models' must be a non-empty mapping"),
    ("modles: {}\n", "unknown top-level keys"),
    ("models: {a: 1\n", "not valid YAML"),
])
def test_file_level_errors(tmp_path, text, message):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_says_how_to_create_it(tmp_path):
    with pytest.raises(ConfigError, match="LORA_DEPLOY_CONFIG"):
        load_config(tmp_path / "nope.yaml")


def test_heavy_pool_slots_must_fit_the_declared_pool(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({
        "settings": {"pools": {"heavy": {"slots": 2000}}},
        "models": {name: {"base_model": "/m", "source": {"kind": "local", "path": "/box"},
                          "workers": {"heavy_pool": "heavy", "heavy_pool_slots": slots}}
                   for name, slots in (("fits", 2000), ("toobig", 3000))}}))
    loaded = load_config(path)
    assert set(loaded.models) == {"fits"} and loaded.settings.pools["heavy"].slots == 2000
    message = str(loaded.errors["toobig"])
    assert "models.toobig.workers.heavy_pool_slots" in message and "settings.pools.heavy.slots" in message
    assert "never be scheduled" in message and "at most 2000" in message


def test_fused_merge_keeps_the_base_dtype():
    assert validate_model("m", {**MINIMAL, "merge": {"backend": "fused"}}).merge.backend == "fused"
    with pytest.raises(ConfigError) as err:
        validate_model("m", {**MINIMAL, "merge": {"backend": "fused", "dtype": "float16"}})
    assert "models.m.merge" in str(err.value) and "merge.dtype must be 'auto'" in str(err.value)
