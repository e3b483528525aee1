"""``scripts/airflow.sh`` as a user starts it: every listener on loopback, the printed password logs in, Ctrl-C
stops every component; ``LORA_DEPLOY_AIRFLOW_HOST`` opens the UI on purpose, with a warning."""

from __future__ import annotations

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
from tests.stand_ins.sshd import free_port

pytestmark = pytest.mark.e2e
READY = "Ctrl-C stops everything"


def start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], int, Path]:
    """The script in its own session with a fresh LORA_DEPLOY_HOME; returns it once it printed READY."""
    port = free_port()
    out = tmp_path / "airflow.out"
    environ = {**os.environ, "LORA_DEPLOY_HOME": str(tmp_path / "home"), "AIRFLOW_PORT": str(port), **env}
    environ.pop("AIRFLOW_HOME", None)
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "airflow.sh")], env=environ, text=True,
                            stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: READY in out.read_text() or proc.poll() is not None, timeout_s=300,
             what="scripts/airflow.sh to start")
    assert proc.poll() is None, out.read_text()[-3000:]
    return proc, port, out


def stop(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """Ctrl-C (SIGINT to the script, as a terminal sends it to the foreground job); the processes left after 60 s."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=90)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
        time.sleep(0.5)
    return [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


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
    assert left == [], [p.cmdline() for p in left]


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
