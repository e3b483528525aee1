"""The architecture's rules, enforced: what docs/architecture.md says, checked on every run.

- ``dags -> operators -> include``, never backwards; ``plugins`` may use ``operators`` and ``include``;
- ``include`` never imports ``airflow``; parsing the DAG file imports no torch/transformers/peft/llama_cpp
  (tests/dags/test_dag_integrity.py checks that one at run time);
- the engine's packages form layers (:data:`LAYERS`): a package imports only from its own layer or lower ones,
  so there is no import cycle between packages, and none between modules either;
- no module is longer than :data:`MAX_LINES` lines.

Imports are read with :mod:`ast` (nothing is imported), including the ones inside functions: a deferred import
is still a dependency. Imports under ``if TYPE_CHECKING:`` are type hints only and are skipped.
"""

from __future__ import annotations

import ast
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
TOP = ("dags", "operators", "plugins", "include")
# Who may import whom among the top-level folders.
ALLOWED_TOP = {
    "include": {"include"},
    "operators": {"operators", "include"},
    "plugins": {"plugins", "operators", "include"},
    "dags": {"dags", "operators", "include"},
}
# The engine's packages from the bottom up: each may import its own layer and the layers before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "retry", "units"),
    ("store", "resources"),
    ("config",),
    ("source", "merge"),
    ("gguf",),
    ("lmstudio", "health", "hub"),
    ("plan", "notify", "trigger", "deployments"),
    ("cli",),
)


def tracked_python() -> list[Path]:
    """Every tracked (or new, not ignored) Python file of the project."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in out if (ROOT / name).is_file()]


def module_name(path: Path) -> str:
    """``include/merge/fused.py`` -> ``include.merge.fused``; packages are named by their ``__init__``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for stmt in child.orelse for n in [stmt, *_walk(stmt)])
            continue
        yield child
        yield from _walk(child)


@cache
def imports_of(path: Path) -> tuple[tuple[str, int], ...]:
    """``(imported module, line)`` of every import in ``path`` (absolute names; ``from a import b`` gives ``a.b``
    when ``a.b`` is a module of the project, else ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ""
    if path.is_relative_to(ROOT):
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((candidate if candidate in project_modules() else base, node.lineno))
    return tuple(found)


@cache
def project_modules() -> frozenset[str]:
    """Dotted names of every module and package of the four top-level folders."""
    return frozenset(module_name(p) for p in tracked_python() if p.relative_to(ROOT).parts[0] in TOP)


def owner(module: str) -> str | None:
    """The project module that ``module`` names or lives in (``include.merge.fused.x`` -> ``include.merge.fused``)."""
    parts = module.split(".")
    while parts:
        name = ".".join(parts)
        if name in project_modules():
            return name
        parts.pop()
    return None


def code_files() -> list[Path]:
    """The Python files of dags/, operators/, plugins/ and include/."""
    return [p for p in tracked_python() if p.relative_to(ROOT).parts[0] in TOP]


def layer_of(module: str) -> int:
    """The layer index of an ``include.<package>`` module (see :data:`LAYERS`).

    A package's ``__main__`` (``python -m include.merge``) is a command-line alias: it sits with ``cli``.
    """
    package = "cli" if module.endswith(".__main__") else module.split(".")[1] if module.count(".") else ""
    for index, names in enumerate(LAYERS):
        if package in names:
            return index
    raise AssertionError(f"{module}: package {package!r} is in no layer of tests/test_architecture.py::LAYERS; "
                         "add it to the layer it belongs to (and to docs/architecture.md)")


def test_top_level_folders_import_only_downwards() -> None:
    bad = []
    for path in code_files():
        top = path.relative_to(ROOT).parts[0]
        for name, line in imports_of(path):
            target = name.split(".")[0]
            if target in TOP and target not in ALLOWED_TOP[top]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} "
                           f"({top} may import {sorted(ALLOWED_TOP[top])})")
    assert not bad, "imports that run backwards (dags -> operators -> include):\n" + "\n".join(bad)


def test_engine_never_imports_airflow() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in code_files()
           if path.relative_to(ROOT).parts[0] == "include"
           for name, line in imports_of(path) if name.split(".")[0] == "airflow"]
    assert not bad, "include/ must not import airflow (the engine knows nothing of Airflow):\n" + "\n".join(bad)


def test_engine_packages_respect_their_layers() -> None:
    bad = []
    for path in code_files():
        source = module_name(path)
        if not source.startswith("include.") or source.count(".") < 1:
            continue
        for name, line in imports_of(path):
            target = owner(name)
            if target is None or not target.startswith("include."):
                continue
            if layer_of(target) > layer_of(source):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}: layer {layer_of(target)} "
                           f"{LAYERS[layer_of(target)]} is above {source}'s layer {layer_of(source)}")
    assert not bad, "engine imports that go up a layer:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    item = stack.pop()
                    on_stack.discard(item)
                    component.append(item)
                    if item == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize("top", TOP)
def test_no_import_cycles(top: str) -> None:
    graph: dict[str, set[str]] = {}
    for path in code_files():
        source = module_name(path)
        if source.split(".")[0] != top:
            continue
        targets = {owner(name) for name, _ in imports_of(path)}
        # A package's __init__ is imported before its modules; an import of the parent package is not a cycle.
        graph[source] = {t for t in targets if t and t.split(".")[0] == top and t != source
                         and not source.startswith(t + ".")}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles in {top}/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_the_size_limit() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in tracked_python()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(long)


def test_every_engine_package_says_what_it_owns() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "include").rglob("__init__.py")
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not missing, "packages without a docstring saying what they own: " + ", ".join(missing)


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: a backwards import and a cycle are found in a planted example."""
    graph = {"include.a": {"include.b"}, "include.b": {"include.a"}, "include.c": set()}
    assert _cycles(graph) == [["include.a", "include.b"]]
    planted = tmp_path / "x.py"
    planted.write_text("from typing import TYPE_CHECKING\nimport airflow.sdk\nif TYPE_CHECKING:\n    import torch\n"
                       "def f():\n    from operators.common import as_bool\n")
    names = [name for name, _ in imports_of(planted)]
    assert names == ["typing", "airflow.sdk", "operators.common"]


# --- hooks own connections ------------------------------------------------------------------------------------
CONNECTION_READERS = ("get_connection", "aget_connection")
HOOKS = ("operators", "hooks")


def connection_reads(path: Path) -> list[tuple[str, int]]:
    """``(called name, line)`` of every ``get_connection`` / ``aget_connection`` call in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in CONNECTION_READERS:
                found.append((name, node.lineno))
    return found


def test_only_hooks_read_connections() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line} calls {name}()" for path in code_files()
           if path.relative_to(ROOT).parts[:2] != HOOKS for name, line in connection_reads(path)]
    assert not bad, ("only operators/hooks/ reads Airflow connections; operators, sensors and triggers name a conn "
                     "id and build the hook from it:\n" + "\n".join(bad))


# --- one source of truth for settings -------------------------------------------------------------------------
@cache
def settings_fields() -> frozenset[str]:
    """Every field name of the config sections (include/config): the keys of a section's ``model_dump()``."""
    from pydantic import BaseModel

    from include.config import model, pools, sections

    classes = {cls for module in (sections, model, pools) for cls in vars(module).values()
               if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__.startswith("include.config")}
    return frozenset(name for cls in classes for name in cls.model_fields)


def _literal(node: ast.AST, *, truthy: bool = False) -> bool:
    """A non-None constant or literal container: a restated default (``truthy``: only one that is not empty or
    false, because ``x.get("k") or ""`` only turns None into an empty value)."""
    if isinstance(node, ast.Constant):
        return node.value is not None and (bool(node.value) or not truthy)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return bool(node.elts) or not truthy
    return isinstance(node, ast.Dict) and (bool(node.keys) or not truthy)


def _settings_key(node: ast.AST) -> str | None:
    """The key of ``x.get("<key>", ...)`` / ``getattr(x, "<key>", ...)`` when it is a config field, else None."""
    if not isinstance(node, ast.Call):
        return None
    func, args = node.func, node.args
    if isinstance(func, ast.Attribute) and func.attr == "get" and args:
        key = args[0]
    elif isinstance(func, ast.Name) and func.id == "getattr" and len(args) >= 2:
        key = args[1]
    else:
        return None
    if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in settings_fields():
        return key.value
    return None


def restated_defaults(path: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of every default of a config field restated in ``path``: ``x.get("field", <literal>)``,
    ``getattr(x, "field", <literal>)`` and ``x.get("field") or <literal that is not empty>``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Call) and _settings_key(node):
            defaults = node.args[1:2] if isinstance(node.func, ast.Attribute) else node.args[2:3]
            if any(_literal(default) for default in defaults):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and _literal(node.values[-1], truthy=True):
            found += [(node.lineno, ast.unparse(node)) for value in node.values[:-1] if _settings_key(value)]
    return found


def test_operators_and_dags_restate_no_setting_default() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {code}" for path in code_files()
           if path.relative_to(ROOT).parts[0] in ("operators", "dags") for line, code in restated_defaults(path)]
    assert not bad, ("defaults of config fields restated outside include/config (take the section instead: "
                     "operators.common.section(QuantizeSettings, settings, ...).min_type_fraction):\n" + "\n".join(bad))


def test_the_hook_and_settings_rules_see_a_violation(tmp_path: Path) -> None:
    planted = tmp_path / "x.py"
    planted.write_text("\n".join([
        "from airflow.sdk import BaseHook", "conn = BaseHook.get_connection('x')",
        "async def f(h):", "    return await h.aget_connection('y')",
        "def g(s, source):", "    a = s.get('min_type_fraction', 0.5)", "    b = s.get('conn_id') or 'hf'",
        "    c = getattr(source, 'transfer', 'auto')", "    d = s.get('min_type_fraction')",
        "    e = s.get('not_a_field', 1)", "    f = s.get('path') or ''", "    return s.get('max_tokens', None)", ""]))
    assert connection_reads(planted) == [("get_connection", 2), ("aget_connection", 4)]
    assert [line for line, _ in restated_defaults(planted)] == [6, 7, 8]


def test_engine_errors_live_in_one_module() -> None:
    """Every public exception class of the engine is defined in include/errors.py (private helpers may not leak)."""
    outside = []
    for path in sorted((ROOT / "include").rglob("*.py")):
        if path.name == "errors.py" and path.parent.name == "include":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                    (getattr(base, "id", None) or getattr(base, "attr", "")).endswith(("Error", "Exception"))
                    for base in node.bases):
                outside.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert outside == [], "define engine errors in include/errors.py: " + ", ".join(outside)
