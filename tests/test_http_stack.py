"""One HTTP library for our own calls: httpx (sync in the engine, async in the triggers).

Nothing in ``include/`` or ``operators/`` may import another HTTP client (``urllib.request``, ``http.client``,
``requests``, ``aiohttp``, ``urllib3``): a second stack means a second set of timeouts, proxies and errors to map,
and a retry loop outside :mod:`include.retry`. Official clients bring their own transport (huggingface_hub,
apache-airflow-client); our code only reads their exception classes, hence ``urllib3.exceptions`` is allowed.
Imports are read with :mod:`ast`, the ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("include", "operators")
FORBIDDEN = ("urllib.request", "http.client", "requests", "aiohttp", "urllib3", "httplib2", "pycurl")
ALLOWED = ("urllib3.exceptions",)


def _banned(module: str) -> bool:
    if any(module == ok or module.startswith(ok + ".") for ok in ALLOWED):
        return False
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN)


def other_http_imports(source: str) -> list[str]:
    """``line: module`` of every import of a forbidden HTTP client in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named = [f"{node.module}.{alias.name}" for alias in node.names]  # from urllib import request
            modules = [node.module] if _banned(node.module) else named
        else:
            continue
        found += [f"{node.lineno}: {module}" for module in modules if _banned(module)]
    return found


def project_files() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_our_http_calls_go_through_httpx(path: Path) -> None:
    found = other_http_imports(path.read_text())
    assert not found, (f"{path.relative_to(ROOT)} imports another HTTP client ({', '.join(found)}): use httpx "
                       "(httpx.Client in include/, httpx.AsyncClient in a trigger) and include.retry")


@pytest.mark.parametrize(("source", "flagged"), [
    ("import urllib.request", ["1: urllib.request"]),
    ("from urllib import request", ["1: urllib.request"]),
    ("from http import client as c", ["1: http.client"]),
    ("def f():\n    import requests.adapters", ["2: requests.adapters"]),
    ("from aiohttp import ClientSession", ["1: aiohttp"]),
    ("import urllib3", ["1: urllib3"]),
    ("import urllib3.exceptions\nfrom urllib.parse import quote\nimport httpx", []),
])
def test_the_scan_finds_other_clients_wherever_they_are_imported(source: str, flagged: list[str]) -> None:
    assert other_http_imports(source) == flagged
