"""``${VAR}`` / ``${VAR:-default}`` expansion in config values and ``~`` expansion of paths."""

from __future__ import annotations

import os
import re
from typing import Any

from include.errors import ConfigError

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, *, where: str) -> Any:
    """Expand environment variables in every string of a YAML value (dicts and lists recursively)."""
    if isinstance(value, dict):
        return {key: expand_env(item, where=f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [expand_env(item, where=f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda match: _lookup(match, where), value)
    return value


def _lookup(match: re.Match[str], where: str) -> str:
    name, default = match.group(1), match.group(2)
    if name in os.environ:
        return os.environ[name]
    if default is not None:
        return expand_env(default, where=where)
    raise ConfigError(f"field {where!r} uses ${{{name}}} but the environment variable {name} is not set",
                      fix=f"export {name}, or write ${{{name}:-default}} to give a default")


def expand_path(value: str) -> str:
    """Expand ``~`` and make the path absolute (relative paths are taken from the current directory)."""
    return os.path.abspath(os.path.expanduser(value))
