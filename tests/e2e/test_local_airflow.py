"""``scripts/airflow.sh`` as a user starts it: every listener on loopback, the printed password logs in, Ctrl-C
stops every component; ``LORA_DEPLOY_AIRFLOW_HOST`` opens the UI on purpose, with a warning."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import ROOT
from tests.e2e.airflow_services import wait_for
from tests.e2e.helpers import LOOPBACK, listeners
from tests.e2e.task_rss import process_tree
from tests.stand_ins.sshd import free_port

pytestmark = pytest.mark.e2e
READY = "Ctrl-C stops everything"


def start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], int, Path]:
    """The script in its own session with a fresh LORA_DEPLOY_HOME; returns it once it printed READY."""
    port = free_port()
    out = tmp_path / "airflow.out"
    environ = {**os.environ, "LORA_DEPLOY_HOME": str(tmp_path / "home"), "AIRFLOW_PORT": str(port), **env}
    environ.pop("AIRFLOW_HOME", None)
    # As from a terminal: SIGINT at its default. A shell started by a background job (CI under nohup, `cmd &`)
    # inherits SIGINT ignored, and bash cannot trap a signal ignored on entry.
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "airflow.sh")], env=environ, text=True,
                            stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: READY in out.read_text() or proc.poll() is not None, timeout_s=300,
             what="scripts/airflow.sh to start")
    assert proc.poll() is None, out.read_text()[-3000:]
    return proc, port, out


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def stop(proc: subprocess.Popen[str]) -> list[str]:
    """Ctrl-C (SIGINT to the script's process group, as a terminal sends it); the command lines of the processes
    still there after 90 s. Whatever is left is then killed, so a failing test leaves nothing running."""
    tree = process_tree([proc.pid])
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _alive(tree):
        time.sleep(0.5)
    left = []
    for leftover in _alive(tree):
        with contextlib.suppress(psutil.Error):
            left.append(" ".join(leftover.cmdline()[:3]))
    for leftover in _alive(tree):
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(leftover.pid), signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return left


def test_the_local_airflow_listens_on_loopback_only_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc, port, out = start(tmp_path)
    try:
        found = listeners([proc.pid])
        assert (("127.0.0.1", port) in {(ip, p) for ip, p, _ in found}), found
        assert [item for item in found if item[0] not in LOOPBACK] == [], found
        assert not any(p in (8793, 8794) for _, p, _ in found), "a log server is running"
        password = re.search(r"log in as admin with password (\S+)", out.read_text()).group(1)
        token = requests.post(f"http://127.0.0.1:{port}/auth/token",
                              json={"username": "admin", "password": password}, timeout=10)
        assert token.status_code == 201, token.text
        dags = requests.get(f"http://127.0.0.1:{port}/api/v2/dags", timeout=10,
                            headers={"Authorization": f"Bearer {token.json()['access_token']}"})
        assert dags.status_code == 200
    finally:
        left = stop(proc)
    assert left == []


def test_exposing_it_is_a_choice_that_warns(tmp_path: Path) -> None:
    proc, port, out = start(tmp_path, LORA_DEPLOY_AIRFLOW_HOST="0.0.0.0")
    try:
        found = listeners([proc.pid])
        assert ("0.0.0.0", port) in {(ip, p) for ip, p, _ in found}, found
        assert "WARNING: the UI listens on 0.0.0.0" in out.read_text()
        # Still only the api-server beyond loopback: no log server
        assert [item for item in found if item[0] not in LOOPBACK and item[1] != port] == [], found
    finally:
        assert stop(proc) == []
