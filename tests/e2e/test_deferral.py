"""The deferrable sensors through a real triggerer: defer, wait in the triggerer, resume on a worker.

One Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor, SQLite, loopback) serves the module,
with ``health.deferrable`` and ``hf.deferrable`` on, the LM Studio stand-in as the live endpoint and the Hub
stand-in for the model repo and its Space. The stand-ins hold each wait open until the test has seen, through
the REST API, the task instance ``deferred`` and the triggerer's log of its trigger polling; only then do they
change (LM Studio answers, the Space runs or breaks), so the deferral is observed every time, not sampled.

One deploy run, triggered over REST, in which ``health`` and ``space_ready`` both defer and resume to success.
Then both sensors of that run are re-run at once (cleared over REST) with LM Studio stopped and a Space that
turns BUILD_ERROR: both defer again and resume to failure, each with its own message. (A fresh run cannot fail
both: ``publish`` runs only after a passing health check.) The two fixtures record what they saw and the tests
assert on the records, so the tests pass in any order.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.airflow_services import AirflowServices, airflow_services, wait_for
from tests.e2e.helpers import LOOPBACK, listeners, write_config

pytestmark = pytest.mark.e2e

MODEL = "defer"
DEPLOY = f"deploy_{MODEL}"
HEALTH_TRIGGER = "operators.triggers.health.LiveEndpointTrigger"
SPACE_TRIGGER = "operators.triggers.hf_space.HFSpaceRuntimeTrigger"
HEALTH_TIMEOUT_S = 30  # the dead endpoint is polled this long before the health check fails
SPACE_TIMEOUT_S = 600  # a Space that breaks must fail long before this
BUILD_ERROR = "stand-in build failed: pip could not resolve llama-cpp-python==0.0.0"
RUN_TIMEOUT_S = 600  # a whole deploy of the tiny model on a busy 2-core machine


@dataclass
class Stack:
    """The running Airflow and the stand-ins it talks to."""

    airflow: AirflowServices
    hub: Any  # tests.stand_ins.hf_hub.HubStandIn
    lmstudio: Any  # tests.stand_ins.lmstudio.LMStudioStandIn
    space_id: str


@dataclass
class Deferral:
    """What one deferred sensor looked like: the REST record while deferred and after, and its logs."""

    deferred: dict[str, Any]  # the task instance while deferred, once its trigger was polling in the triggerer
    final: dict[str, Any]  # the task instance after it resumed
    trigger_log: str  # the files the triggerer wrote for the trigger
    task_log: str  # the try's log through the REST API
    resumed_after_s: float  # from the stand-in's change to the task instance's final state


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_inputs: Any) -> Iterator[Stack]:
    """Airflow with the deployable model ``defer`` (deferrable health check and Space wait), the LM Studio stand-in
    (and its ``lms`` on the components' PATH) and the Hub stand-in."""
    from tests.stand_ins.hf_hub import HubStandIn
    from tests.stand_ins.lmstudio import LMStudioStandIn

    tmp = tmp_path_factory.mktemp("deferral")
    # The lms stand-in on the components' PATH, sharing its state file with the LM Studio server stand-in
    # (as the function-scoped `lmstudio` fixture does for in-process tests).
    bin_dir, state, calls, models = tmp / "bin", tmp / "lms-state.json", tmp / "lms-calls.jsonl", tmp / "lmstudio"
    bin_dir.mkdir()
    (bin_dir / "lms").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "stand_ins" / "lms"}" "$@"\n')
    (bin_dir / "lms").chmod(0o755)
    with HubStandIn() as hub, LMStudioStandIn(models, state) as lmstudio:
        space_id = f"{hub.user}/defer-chat"
        entry = {"base_model": str(demo_inputs.base),
                 "source": {"kind": "local", "path": str(demo_inputs.training_box)},
                 "quantize": {"types": ["Q8_0"]}, "fidelity": {"enabled": False}, "notify": {"slack_conn_id": None},
                 "lmstudio": {"models_dir": str(models), "endpoint": lmstudio.url, "gpu": "off"},
                 "health": {"max_tokens": 8, "poke_interval_s": 1, "timeout_s": HEALTH_TIMEOUT_S, "deferrable": True},
                 "hf": {"repo_id": f"{hub.user}/defer-GGUF", "space_id": space_id, "private": False,
                        "space_poke_interval_s": 1, "space_timeout_s": SPACE_TIMEOUT_S, "deferrable": True}}
        config = write_config(tmp / "models.yaml", MODEL, entry, tmp / "artifacts")
        services = airflow_services(tmp / "airflow", {
            "LORA_DEPLOY_CONFIG": str(config), "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp / "hf"),
            "AIRFLOW_CONN_HUGGINGFACE_DEFAULT": json.dumps({"conn_type": "generic", "host": hub.url,
                                                             "password": hub.token}),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "LMS_STANDIN_STATE": str(state),
            "LMS_STANDIN_CALLS": str(calls), "LMS_STANDIN_MODELS": str(models),
        })
        services.start()
        try:
            yield Stack(airflow=services, hub=hub, lmstudio=lmstudio, space_id=space_id)
        finally:
            services.stop()
        assert hub.unknown_routes == []


def set_space_stage(stack: Stack, stage: str, message: str | None = None) -> None:
    """Put the Space in ``stage`` (with ``errorMessage`` ``message``) until something rebuilds it; and make any
    rebuild (a publish, a restart) hold at BUILDING too, so only the test moves the Space on."""
    hub = stack.hub
    with hub.lock:
        hub.space_build_stages = ["BUILDING"]
        if ("space", stack.space_id) in hub.repos:
            repo = hub.repo(stack.space_id, "space")
            repo.stages, repo.error_message = [stage], message


def deferral_exit_processed(airflow: AirflowServices, dag_id: str, run_id: str, task_id: str, try_number: int) -> bool:
    """True once the scheduler has handled the executor's report that the deferring worker process exited.

    Airflow 3.3.2 fails a deferred task whose resumed attempt is already running when that (stale) report is
    handled (apache/airflow#72716; the supervisor may report the exit ~5 s late). Releasing a wait only after this
    keeps that upstream race out of these tests.
    """
    pattern = (rf"TaskInstance Finished: dag_id={re.escape(dag_id)}, task_id={re.escape(task_id)}, "
               rf"run_id={re.escape(run_id)}, .*?state=deferred, .*?executor_state=success, try_number={try_number},")
    return re.search(pattern, (airflow.home / "scheduler.log").read_text(errors="replace")) is not None


def hold(stack: Stack, dag_id: str, run_id: str, task_id: str, *, polling: str) -> dict[str, Any]:
    """Wait until ``task_id`` is deferred, the triggerer's log of its trigger shows ``polling`` (the trigger ran at
    least once against the held stand-in) and the scheduler has handled the deferring process's exit; return the
    task instance's record (its trigger now carries the id of the triggerer running it)."""
    airflow = stack.airflow
    deferred = airflow.wait_for_task_state(dag_id, run_id, task_id, {"deferred"}, timeout_s=RUN_TIMEOUT_S)
    try_number = deferred["try_number"]
    wait_for(lambda: polling in airflow.trigger_logs(dag_id, run_id, task_id, try_number), timeout_s=120,
             what=f"the triggerer's log of {task_id} to show {polling!r}")
    wait_for(lambda: deferral_exit_processed(airflow, dag_id, run_id, task_id, try_number),
             timeout_s=60, what=f"the scheduler to handle the exit of {task_id}'s deferring process")
    return airflow.task_instance(dag_id, run_id, task_id)


def resume(stack: Stack, dag_id: str, run_id: str, task_id: str, deferred: dict[str, Any], *,
           release: Callable[[], None], ends: set[str]) -> Deferral:
    """``release`` the stand-in that holds the deferred ``task_id``, wait for its final state and collect its logs."""
    airflow = stack.airflow
    released = time.monotonic()
    release()
    final = airflow.wait_for_task_state(dag_id, run_id, task_id, ends, timeout_s=HEALTH_TIMEOUT_S + 180)
    resumed_after_s = time.monotonic() - released
    logs = (dag_id, run_id, task_id, final["try_number"])
    return Deferral(deferred=deferred, final=final, trigger_log=airflow.trigger_logs(*logs),
                    task_log=airflow.task_log(*logs),
                    resumed_after_s=resumed_after_s)


def task_states(airflow: AirflowServices, dag_id: str, run_id: str) -> dict[str, str]:
    """Every task instance's state in the run."""
    response = airflow.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    response.raise_for_status()
    return {ti["task_id"]: ti["state"] for ti in response.json()["task_instances"]}


@pytest.fixture(scope="module")
def succeeded(stack: Stack) -> dict[str, Any]:
    """The run: LM Studio answers HTTP 500 and the Space builds until each sensor is seen deferred, then both heal."""
    stack.lmstudio.set_fail(MODEL, "error")
    set_space_stage(stack, "BUILDING")
    run_id = stack.airflow.trigger(DEPLOY, {"adapter_version": "checkpoint-10"})
    held = hold(stack, DEPLOY, run_id, "health", polling="live endpoint not healthy yet (attempt 1)")
    health = resume(stack, DEPLOY, run_id, "health", held, release=lambda: stack.lmstudio.set_fail(MODEL, None),
                    ends={"success"})
    held = hold(stack, DEPLOY, run_id, "space_ready", polling="is BUILDING (poll 1)")
    space = resume(stack, DEPLOY, run_id, "space_ready", held, release=lambda: set_space_stage(stack, "RUNNING"),
                   ends={"success"})
    state = stack.airflow.wait_for_run(DEPLOY, run_id, timeout_s=RUN_TIMEOUT_S)
    return {"run_id": run_id, "state": state, "states": task_states(stack.airflow, DEPLOY, run_id),
            "health": health, "space": space}


@pytest.fixture(scope="module")
def failed(stack: Stack, succeeded: dict[str, Any]) -> dict[str, Any]:
    """Both sensors of that run re-run at once (cleared through the REST API, as a user re-runs tasks), with LM
    Studio stopped and the Space building until seen deferred, then turning BUILD_ERROR."""
    airflow, run_id = stack.airflow, succeeded["run_id"]
    stack.lmstudio.__exit__(None, None, None)  # nothing listens on its port any more
    set_space_stage(stack, "BUILDING")
    airflow.api("POST", f"/dags/{DEPLOY}/clearTaskInstances", json={
        "dry_run": False, "dag_run_id": run_id, "task_ids": ["health", "space_ready"], "only_failed": False,
    }).raise_for_status()
    # Both held first: the dead endpoint fails the health check health.timeout_s after its trigger started.
    health_held = hold(stack, DEPLOY, run_id, "health", polling="All connection attempts failed")
    space_held = hold(stack, DEPLOY, run_id, "space_ready", polling="is BUILDING (poll 1)")
    space = resume(stack, DEPLOY, run_id, "space_ready", space_held,
                   release=lambda: set_space_stage(stack, "BUILD_ERROR", BUILD_ERROR), ends={"failed"})
    health = resume(stack, DEPLOY, run_id, "health", health_held, release=lambda: None,  # it stays dead
                    ends={"failed"})
    state = airflow.wait_for_run(DEPLOY, run_id, timeout_s=RUN_TIMEOUT_S)
    return {"run_id": run_id, "state": state, "states": task_states(airflow, DEPLOY, run_id), "health": health,
            "space": space}


def assert_ran_in_the_triggerer(stack: Stack, deferral: Deferral, classpath: str, run_id: str, task_id: str, *,
                                try_number: int) -> None:
    """The deferred record names the trigger and the triggerer job that ran it; that job wrote the trigger's log."""
    trigger = deferral.deferred["trigger"]
    assert deferral.deferred["state"] == "deferred" and trigger["classpath"] == classpath, deferral.deferred
    jobs = stack.airflow.api("GET", "/jobs", params={"job_type": "TriggererJob"}).json()["jobs"]
    assert trigger["triggerer_id"] in [job["id"] for job in jobs], (trigger, jobs)
    log = deferral.trigger_log
    assert f".trigger.{trigger['triggerer_id']}.log" in log, log[:500]
    name = f"{DEPLOY}/{run_id}/{task_id}/-1/{try_number} (ID {trigger['id']})"
    assert f"trigger {name} starting" in log and "Trigger fired event" in log, log[-3000:]
    assert f'"logger":"{classpath}"' in log, log[-3000:]  # the trigger's own lines (its polls), from the triggerer
    # It resumed in the try that deferred: no retry.
    assert deferral.final["try_number"] == deferral.deferred["try_number"] == try_number, deferral.final


def test_health_defers_to_the_triggerer_and_resumes_to_success(stack: Stack, succeeded: dict[str, Any]) -> None:
    health = succeeded["health"]
    assert health.final["state"] == "success", health.final
    assert_ran_in_the_triggerer(stack, health, HEALTH_TRIGGER, succeeded["run_id"], "health", try_number=1)
    # The trigger met the held endpoint (HTTP 500) first, then the healthy one.
    assert "HTTPStatusError: Server error '500 Internal Server Error'" in health.trigger_log
    assert "'ok': True" in health.trigger_log, health.trigger_log[-2000:]
    # The worker resumed in execute_complete with the trigger's event, and recorded the live figures.
    assert "deferring the live check of 'defer'" in health.task_log
    assert "triggerer finished after" in health.task_log and "live health of defer checkpoint-10" in health.task_log
    assert "Trigger fired event" in health.task_log  # the UI's log of the try shows the triggerer's part too
    assert health.resumed_after_s < 60
    assert succeeded["state"] == "success", succeeded["states"]


def test_space_wait_defers_to_the_triggerer_and_resumes_to_success(stack: Stack, succeeded: dict[str, Any]) -> None:
    space = succeeded["space"]
    assert space.final["state"] == "success", space.final
    assert_ran_in_the_triggerer(stack, space, SPACE_TRIGGER, succeeded["run_id"], "space_ready", try_number=1)
    assert "'status': 'running'" in space.trigger_log, space.trigger_log[-2000:]
    assert f"Space {stack.space_id} is RUNNING after" in space.task_log
    # The Hub token is read in the triggerer from the connection: it is neither stored with the trigger nor logged.
    assert stack.hub.token not in json.dumps(space.deferred) + space.trigger_log + space.task_log
    assert space.resumed_after_s < 60
    assert succeeded["state"] == "success", succeeded["states"]


def test_space_build_error_resumes_to_failure_long_before_the_timeout(stack: Stack, failed: dict[str, Any]) -> None:
    space = failed["space"]
    assert space.final["state"] == "failed", space.final
    assert_ran_in_the_triggerer(stack, space, SPACE_TRIGGER, failed["run_id"], "space_ready", try_number=2)
    assert f"Space {stack.space_id} is BUILD_ERROR: {BUILD_ERROR}" in space.task_log, space.task_log[-3000:]
    assert "did not reach RUNNING" not in space.task_log  # not the timeout's message
    assert "'status': 'error'" in space.trigger_log, space.trigger_log[-2000:]
    # It failed on the first poll after the change: seconds, against a 600 s timeout.
    assert space.resumed_after_s < 60 and space.final["duration"] < SPACE_TIMEOUT_S / 5, space.final
    assert failed["state"] == "failed", failed["states"]


def test_dead_lm_studio_resumes_to_failure_with_the_connection_error(stack: Stack, failed: dict[str, Any]) -> None:
    health = failed["health"]
    assert health.final["state"] == "failed", health.final
    assert_ran_in_the_triggerer(stack, health, HEALTH_TRIGGER, failed["run_id"], "health", try_number=2)
    # Only a refused connection gives httpx's ConnectError; the trigger polled it until health.timeout_s.
    assert "live check failed: ConnectError: All connection attempts failed" in health.task_log, health.task_log[-3000:]
    assert "HTTPStatusError" not in health.task_log and "is not listed by /v1/models" not in health.task_log
    assert "'ok': False" in health.trigger_log
    attempts = health.trigger_log.count("live endpoint not healthy yet")
    assert attempts >= HEALTH_TIMEOUT_S / 3 and health.resumed_after_s < HEALTH_TIMEOUT_S + 60, attempts


def test_the_triggerer_serves_no_logs(stack: Stack) -> None:
    """Started with --skip-serve-logs, the triggerer (and its trigger runner) listens on no address at all."""
    triggerer = stack.airflow.processes["triggerer"].pid
    found = listeners([triggerer])
    assert found == [], found
    everything = listeners([p.pid for p in stack.airflow.processes.values()])
    assert [item for item in everything if item[0] not in LOOPBACK] == []
