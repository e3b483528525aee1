"""A real local Airflow for tests: api-server, scheduler, dag-processor and triggerer on 127.0.0.1, SQLite.

Started with ``setsid`` (own process groups) and stopped by the fixture; talked to through the REST API
with a SimpleAuthManager token, as a training job or a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.conftest import ROOT
from tests.stand_ins.sshd import free_port

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
SKIP_SERVE_LOGS = {"scheduler": ("--skip-serve-logs",), "triggerer": ("--skip-serve-logs",)}


def wait_for(check: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


@dataclass
class AirflowServices:
    """A running local Airflow; ``api`` calls its REST API with a bearer token."""

    home: Path
    port: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    token: str = ""
    password: str = "admin"

    @property
    def url(self) -> str:
        """Base URL of the api-server."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120, components: tuple[str, ...] = COMPONENTS) -> None:
        """Migrate the DB, start the components (default: all), wait until the API answers and a token is issued."""
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        for name in components:
            log = (self.home / f"{name}.log").open("wb")
            # No log server (it would listen on every interface): the api-server reads the task logs from disk.
            argv = [sys.executable, "-m", "airflow", name, *SKIP_SERVE_LOGS.get(name, ())]
            self.processes[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
        wait_for(self._healthy, timeout_s=timeout_s, what="the api-server's health endpoint")
        response = requests.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.password},
                                 timeout=10)
        response.raise_for_status()
        self.token = response.json()["access_token"]

    def _healthy(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"airflow {name} exited: {self.log_tail(name)}")
        try:
            return requests.get(f"{self.url}/api/v2/monitor/health", timeout=10).ok
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow to answer on a loaded machine
            return False

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One authenticated REST call."""
        return requests.request(method, f"{self.url}/api/v2{path}", timeout=30,
                                headers={"Authorization": f"Bearer {self.token}"}, **kwargs)

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, timeout_s: float = 180) -> str:
        """Wait for the DAG to be parsed, unpause it and create a run; return the run id."""
        wait_for(lambda: self.api("GET", f"/dags/{dag_id}").ok, timeout_s=timeout_s, what=f"{dag_id} to be parsed")
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        response = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        response.raise_for_status()
        return response.json()["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 300) -> str:
        """The run's final state (success or failed)."""
        def finished() -> str | None:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}").json().get("state")
            return state if state in ("success", "failed") else None

        return wait_for(finished, timeout_s=timeout_s, what=f"{dag_id} run {run_id} to finish", interval_s=1)

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        """One task instance's REST record (``state``, ``try_number``, ``trigger`` while deferred, ...)."""
        response = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
        response.raise_for_status()
        return response.json()

    def wait_for_task_state(self, dag_id: str, run_id: str, task_id: str, states: set[str],
                            timeout_s: float = 300, interval_s: float = 0.5) -> dict[str, Any]:
        """Poll the task instance until its state is one of ``states``; return its record.

        Fails at once, with the record, when the task instance ends in a final state that is not wanted.
        """
        final = {"success", "failed", "skipped", "upstream_failed", "removed"}

        def reached() -> dict[str, Any] | None:
            record = self.task_instance(dag_id, run_id, task_id)
            if record.get("state") in states:
                return record
            if record.get("state") in final:
                raise AssertionError(f"{dag_id}/{run_id}/{task_id} ended {record['state']}, not {sorted(states)}: "
                                     f"{record}")
            return None

        return wait_for(reached, timeout_s=timeout_s, what=f"{dag_id}/{task_id} to be {sorted(states)}",
                        interval_s=interval_s)

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """A try's log as the UI shows it (REST, full content): one JSON record a line, the part the triggerer
        wrote for a deferred try included."""
        response = requests.get(f"{self.url}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/"
                                f"{try_number}", params={"full_content": "true"}, timeout=30,
                                headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json"})
        response.raise_for_status()
        return "\n".join(json.dumps(item) for item in response.json()["content"])

    def trigger_logs(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """What the triggerer wrote for a try's triggers: the files ``attempt=<n>.log.trigger.<triggerer job id>.log``
        next to the try's log (one JSON record a line), each headed ``== <file name>``."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return "\n".join(f"== {path.name}\n{path.read_text(errors='replace')}"
                         for path in sorted(folder.glob(f"attempt={try_number}.log.trigger.*.log")))

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The end of one component's log."""
        return (self.home / f"{name}.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Stop every component (its whole process group)."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def airflow_services(home: Path, extra_env: dict[str, str], password: str = "admin",
                     plugins: bool = False) -> AirflowServices:
    """Configure (not start) a local Airflow under ``home``; user ``admin`` logs in with ``password``.

    ``plugins`` loads the project's plugins/ (the Deployments page) into the components.
    """
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": password}))
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",  # as scripts/airflow.sh and docker-compose.yaml
        "PYTHONPATH": str(ROOT),
        **({"AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins")} if plugins else {}),
        **extra_env,
    }
    return AirflowServices(home=home, port=port, env=env, password=password)
