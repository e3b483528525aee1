"""config/models.yaml: the typed schema and a loader that validates each model on its own.

The sections of a model entry live in :mod:`include.config.sections`, the entry and the deployment settings
in :mod:`include.config.model`; this module reads and validates the file.

The file has three top-level keys::

    settings:  {artifact_root: ..., llama_cpp_dir: ...}   # one per deployment
    defaults:  {...}                                      # deep-merged under every model entry
    models:    {<name>: {...}, ...}                       # one DAG per entry

A problem with the file as a whole (YAML syntax, ``models`` not a mapping, bad settings) raises
:class:`ConfigError`. A problem inside one model entry is collected per model, so one bad entry breaks
only that model's DAG. Strings may use ``${VAR}`` or ``${VAR:-default}``; paths may start with ``~``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from include.config.expand import expand_env
from include.config.model import LoadedConfig, ModelConfig, Settings
from include.config.pools import check_heavy_pool
from include.errors import ConfigError

# libyaml's safe loader parses a 500-model file ~10x faster than the pure-Python one (same semantics).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def default_config_path() -> Path:
    """``$LORA_DEPLOY_CONFIG`` or the project's ``config/models.yaml``."""
    env = os.environ.get("LORA_DEPLOY_CONFIG")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "config" / "models.yaml"


def load_config(path: Path | None = None) -> LoadedConfig:
    """Read and validate a config file; per-model problems land in ``errors``, file-level ones raise."""
    path = Path(path) if path else default_config_path()
    raw = _read_yaml(path)
    settings = _validate_settings(raw.get("settings") or {}, path)
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must be a mapping, got {type(defaults).__name__}",
                          fix="write `defaults:` as key: value pairs or remove it")
    loaded = LoadedConfig(path=path, settings=settings)
    for name, entry in raw["models"].items():
        try:
            model = validate_model(str(name), entry, defaults)
            check_heavy_pool(model.name, model.workers.heavy_pool, model.workers.heavy_pool_slots, settings.pools)
            loaded.models[str(name)] = model
        except ConfigError as err:
            loaded.errors[str(name)] = err
    return loaded


def validate_model(name: str, entry: Any, defaults: dict[str, Any] | None = None) -> ModelConfig:
    """Validate one model entry (with the defaults merged under it) or raise a ConfigError naming it."""
    if not isinstance(entry, dict):
        raise ConfigError(f"the entry must be a mapping of settings, got {entry!r}", model=name,
                          fix="write the model's settings as key: value pairs under its name")
    try:
        merged = expand_env(_deep_merge(defaults or {}, entry), where=f"models.{name}")
        return ModelConfig(name=name, **merged)
    except ConfigError as err:
        raise err.for_model(name) from None
    except ValidationError as err:
        raise ConfigError(_describe(err, name), model=name, fix=_fix_for(err, name)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror}",
                          fix="create it (see config/models.example.yaml) or set LORA_DEPLOY_CONFIG") from err
    try:
        raw = yaml.load(text, Loader=_SAFE_LOADER) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}", fix="correct the YAML syntax at the line shown") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'models:'",
                          fix="see config/models.example.yaml")
    unknown = sorted(set(raw) - {"settings", "defaults", "models"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {unknown}",
                          fix="only 'settings', 'defaults' and 'models' are allowed at the top level")
    if not isinstance(raw.get("models"), dict) or not raw["models"]:
        raise ConfigError(f"{path}: 'models' must be a non-empty mapping of model name -> settings",
                          fix="add at least one model under `models:`")
    return raw


def _validate_settings(raw: Any, path: Path) -> Settings:
    try:
        return Settings(**expand_env(raw, where="settings"))
    except (TypeError, ValidationError) as err:
        raise ConfigError(f"{path}: invalid settings: {err}", fix="see config/models.example.yaml") from None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _location(error: dict[str, Any]) -> str:
    # Discriminated unions put the tag in the location ("source.local.path"); drop it for readers.
    parts = [str(p) for p in error["loc"] if p not in ("local", "ssh", "vastai")]
    return ".".join(parts) or "(entry)"


def _describe(err: ValidationError, name: str) -> str:
    problems = []
    for error in err.errors():
        problems.append(f"field 'models.{name}.{_location(error)}': {error['msg']} (got {error.get('input')!r})")
    return "; ".join(problems)


def _fix_for(err: ValidationError, name: str) -> str:
    fixes = []
    for error in err.errors():
        where = f"models.{name}.{_location(error)}"
        kind = error["type"]
        if kind == "missing":
            fixes.append(f"add `{where}`")
        elif kind == "extra_forbidden":
            fixes.append(f"remove `{where}` or correct its spelling")
        elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
            fixes.append(f"set `models.{name}.source.kind` to 'local', 'ssh' or 'vastai'")
        else:
            fixes.append(f"correct `{where}` as the message says")
    return "; ".join(dict.fromkeys(fixes))
