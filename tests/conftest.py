"""Session-wide test setup: an isolated Airflow home, cached tiny models, and the real/stand-in services.

The environment is set here, at import, because Airflow reads its configuration when first imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SESSION_DIR = Path(tempfile.mkdtemp(prefix="lora-deploy-tests-"))

os.environ["AIRFLOW_HOME"] = str(SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["LORA_DEPLOY_HOME"] = str(SESSION_DIR / "home")
os.environ["LORA_DEPLOY_CONFIG"] = str(ROOT / "config" / "models.yaml")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
for _secret in ("HF_TOKEN", "VAST_API_KEY"):
    os.environ.pop(_secret, None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's temp dir (models, stores, Airflow home) unless asked to keep it."""
    if not os.environ.get("LORA_DEPLOY_KEEP_TEST_DIR"):
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


def _model_cache() -> Path:
    """Generated models are cached across sessions, keyed by the generator's source."""
    from include.store.hashing import sha256_file

    fixtures = ROOT / "tests" / "fixtures"
    digest = "".join(sha256_file(fixtures / name)[:8] for name in ("tiny_model.py", "demo_inputs.py"))
    return Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy")) / "test-models" / digest


@pytest.fixture(scope="session")
def demo_inputs():
    """The demo's base model and training box (two checkpoints), generated once and cached. Read-only."""
    from tests.fixtures.demo_inputs import prepare_demo

    return prepare_demo(_model_cache())


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated SQLite metadata DB in the session's Airflow home."""
    from airflow.utils.db import initdb

    initdb()


@pytest.fixture(scope="session")
def sshd() -> Iterator[object]:
    """A real OpenSSH server on 127.0.0.1 (serving this machine's files) for the session."""
    from tests.stand_ins.sshd import start_sshd

    server = start_sshd(SESSION_DIR / "sshd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def stand_ins_served_every_request() -> Iterator[None]:
    """Fail the test when an HTTP stand-in it used (``tests.stand_ins``) answered a request it does not serve:
    an unknown path or method. Runs after the test's own fixtures are torn down; a test that means to hit an
    unknown route acknowledges it with ``stand_in.expect_unknown(...)``."""
    yield
    from tests.stand_ins import unknown_route_report

    if report := unknown_route_report():
        pytest.fail("stand-ins received requests they do not serve (a test that means to make one says so with "
                    "expect_unknown):\n" + "\n".join(report), pytrace=False)


@pytest.fixture
def slack() -> Iterator[object]:
    """A Slack webhook receiver on loopback."""
    from tests.stand_ins.slack import SlackReceiver

    with SlackReceiver() as receiver:
        yield receiver


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[object]:
    """A Hugging Face Hub stand-in on loopback; the real client talks to it (Xet off, no saved token)."""
    from huggingface_hub import constants

    from tests.stand_ins.hf_hub import HubStandIn

    assert constants.HF_HUB_DISABLE_XET, "HF_HUB_DISABLE_XET must be set before huggingface_hub is imported"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubStandIn() as stand_in:
        yield stand_in


@pytest.fixture
def lmstudio(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[object]:
    """An LM Studio stand-in: its server (real llama.cpp) on loopback and a stand-in ``lms`` on PATH.

    HOME is a fresh directory holding ``.lmstudio/models`` (so build GGUFs in fixtures that run before this one:
    the llama.cpp toolchain is found under the real HOME); ``stand_in.calls()`` are the recorded ``lms`` argvs.
    """
    import json
    import sys

    from tests.stand_ins.lmstudio import LMStudioStandIn

    home = tmp_path / "user-home"
    models = home / ".lmstudio" / "models"
    state, calls, bin_dir = tmp_path / "lms-state.json", tmp_path / "lms-calls.jsonl", tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "lms"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "stand_ins" / "lms"}" "$@"\n')
    wrapper.chmod(0o755)
    calls.touch()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("LMS_STANDIN_STATE", str(state))
    monkeypatch.setenv("LMS_STANDIN_CALLS", str(calls))
    monkeypatch.setenv("LMS_STANDIN_MODELS", str(models))
    with LMStudioStandIn(models, state) as stand_in:
        stand_in.home = home
        stand_in.lms = str(wrapper)
        stand_in.calls = lambda: [json.loads(line)["argv"] for line in calls.read_text().splitlines()]
        yield stand_in


@pytest.fixture(scope="session")
def gguf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared directory of the tiny model's GGUFs (see tests.gguf_helpers.tiny_gguf)."""
    root = tmp_path_factory.getbasetemp() / "tiny-gguf"
    root.mkdir(exist_ok=True)
    return root
