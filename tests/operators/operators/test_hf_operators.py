"""publish -> space_ready in a real Airflow DAG (``dag.test()``) against the Hub stand-in; the sensor's poke and
defer paths; the trigger's ``run()``; the extra links computed by Airflow from the publish record."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, TaskDeferred

from include.store.hashing import sha256_file
from operators.triggers.hf_space import HFSpaceRuntimeTrigger
from tests.operators.operators.test_lmstudio_operators import register
from tests.secrets_scan import assert_no_secrets

MODEL = "majora"
T1, T2 = "2026-11-01T03:00:00+00:00", "2026-11-02T03:00:00+00:00"


def settings(hub: Any, **over: Any) -> dict[str, Any]:
    """``ModelConfig.hf.model_dump(mode="json")`` for the stand-in (fast polls)."""
    from include.config.sections import HFSettings

    base = HFSettings(repo_id=f"{hub.user}/{MODEL}-GGUF", space_id=f"{hub.user}/{MODEL}-chat", private=True,
                      space_poke_interval_s=0.2, space_timeout_s=10, max_retries=2)
    return {**base.model_dump(mode="json"), **over}


@pytest.fixture
def hf_env(hub: Any, monkeypatch: pytest.MonkeyPatch, airflow_db: None) -> Any:
    """The connection ``huggingface_default`` pointing at the stand-in (token as password)."""
    monkeypatch.setenv("AIRFLOW_CONN_HUGGINGFACE_DEFAULT", json.dumps(
        {"conn_type": "generic", "host": hub.url, "password": hub.token}))
    return hub


def ggufs(tmp_path: Path, salt: str) -> list[dict[str, Any]]:
    """Quant file records as the mapped quantize task hands them over."""
    records = []
    for quant in ("Q4_K_M", "Q8_0"):
        path = tmp_path / f"{quant}-{salt}.gguf"
        path.write_bytes(b"GGUF\x03\x00\x00\x00" + salt.encode() + quant.encode() * 300)
        records.append({"quant": quant, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path),
                        "bits_per_weight": 5.0, "perplexity": 10.0, "perplexity_f16": 9.9, "ppl_ratio": 1.01})
    return records


def build_dag(dag_id: str, *, files: list[dict], version: str, when: str, hf: dict | None) -> Any:
    from airflow.sdk import DAG

    from operators.operators.hf_space import HFSpaceDeployOperator
    from operators.sensors.hf_space import HFSpaceRuntimeSensor

    with DAG(dag_id, schedule=None, catchup=False) as dag:
        publish = HFSpaceDeployOperator(
            task_id="publish", model=MODEL, ggufs=files, settings=hf, base_model="Qwen/Qwen2.5-0.5B-Instruct",
            adapter={"version": version, "time": when, "path": f"/box/out/{version}", "sha256": "0" * 64},
            health={"latency_s": 0.4, "tokens_per_s": 33.0}, converted={"llama_cpp": "b1", "fidelity": None},
            retries=0)
        ready = HFSpaceRuntimeSensor(task_id="space_ready", model=MODEL, published=publish.output, settings=hf)
        publish >> ready
    return dag


def run(dag: Any) -> tuple[str, dict[str, tuple[str, Any]], dict[str, Any]]:
    """Run the DAG; return its state, ``{task_id: (state, return_value)}`` and the stored link XComs."""
    return run_with_dag_run(dag)[1:]


def run_with_dag_run(dag: Any) -> tuple[Any, str, dict[str, tuple[str, Any]], dict[str, Any]]:
    """:func:`run`, with the DagRun first (its run id, its task instances)."""
    register(dag)
    dag_run = dag.test()
    out, links = {}, {}
    for ti in dag_run.get_task_instances():
        out[ti.task_id] = (str(ti.state), ti.xcom_pull(task_ids=ti.task_id))
        for key in ("_link_HFModelRepoLink", "_link_HFSpaceLink"):
            value = ti.xcom_pull(task_ids=ti.task_id, key=key)
            if value is not None:
                links[f"{ti.task_id}{key}"] = value
    return dag_run, str(dag_run.state), out, links


def test_publish_then_space_ready_in_a_dag_with_links_and_no_token_anywhere(hf_env, tmp_path, caplog, capfd):
    hub = hf_env
    caplog.set_level("INFO")
    hf = settings(hub)

    dag_run, state, out, links = run_with_dag_run(build_dag("hf_publish_ok", files=ggufs(tmp_path, "a"),
                                                            version="checkpoint-20", when=T1, hf=hf))

    assert state == "success", out
    record = out["publish"][1]
    assert record["main_moved"] and record["space_action"] == "created" and record["tag"] == "v-checkpoint-20"
    assert out["space_ready"][0] == "success"
    assert out["space_ready"][1]["stage"] == "RUNNING" and out["space_ready"][1]["space_id"] == hf["space_id"]
    assert links["publish_link_HFModelRepoLink"] == f"{hub.url}/{hf['repo_id']}/tree/v-checkpoint-20"
    assert links["publish_link_HFSpaceLink"] == f"{hub.url}/spaces/{hf['space_id']}"
    assert links["space_ready_link_HFSpaceLink"] == f"{hub.url}/spaces/{hf['space_id']}"
    space = hub.repo(hf["space_id"], "space")
    assert set(space.secrets) == {"HF_TOKEN"} and space.variables["MODEL_FILE"]["value"] == f"{MODEL}-Q4_K_M.gguf"
    captured = capfd.readouterr()
    # dag.test() runs the tasks in-process: their log is the captured output (no file under $AIRFLOW_HOME/logs).
    assert "published" in captured.out or "publishing" in captured.out
    report = assert_no_secrets({"Hub token": hub.token}, dag_ids="hf_publish_ok", run_ids=[dag_run.run_id],
                               captured={"stdout": captured.out, "stderr": captured.err, "caplog": caplog.text},
                               hub=hub)
    assert report.read["XCom"] >= 5 and report.read["rendered task fields"] == 2 and report.read["Hub file"] >= 5


def test_build_error_fails_space_ready_with_the_stage_message(hf_env, tmp_path, capfd):
    hub = hf_env
    hub.space_build_stages = ["BUILDING", "BUILD_ERROR"]
    hub.space_error_message = "Build failed: llama-cpp-python wheel"
    timeout_s = 30  # the sensor needs well under a second here: a sensor ignoring BUILD_ERROR would wait all of it

    dag_run, state, out, _ = run_with_dag_run(build_dag(
        "hf_publish_build_error", files=ggufs(tmp_path, "a"), version="1", when=T1,
        hf=settings(hub, space_timeout_s=timeout_s)))

    assert state == "failed" and out["publish"][0] == "success" and out["space_ready"][0] == "failed"
    log = capfd.readouterr().out
    space_id = f"{hub.user}/{MODEL}-chat"
    assert (f"AirflowFailException: model 'majora': Space {space_id} is BUILD_ERROR: Build failed: llama-cpp-python "
            f"wheel. Fix: open {hub.url}/spaces/{space_id} (Logs tab)") in log
    assert "did not reach RUNNING" not in log
    polls = [path for method, path in hub.requests if method == "GET" and path.endswith(f"{space_id}/runtime")]
    assert len(polls) == 2, "the sensor must stop at the first BUILD_ERROR it reads"
    ready = dag_run.get_task_instance("space_ready")
    waited = (ready.end_date - ready.start_date).total_seconds()
    assert ready.try_number == 1 and waited * 5 <= timeout_s, f"space_ready took {waited:.1f} s of {timeout_s} s"


def test_backfill_run_skips_space_ready_and_no_hf_section_skips_both(hf_env, tmp_path):
    hub = hf_env
    hf = settings(hub)
    assert run(build_dag("hf_new", files=ggufs(tmp_path, "n"), version="40", when=T2, hf=hf))[0] == "success"

    state, out, links = run(build_dag("hf_backfill", files=ggufs(tmp_path, "o"), version="20", when=T1, hf=hf))

    assert state == "success" and out["space_ready"][0] == "skipped"
    assert out["publish"][1]["main_moved"] is False and hub.repo(hf["repo_id"]).tags.keys() == {"v-40", "v-20"}
    assert links["publish_link_HFModelRepoLink"].endswith("/tree/v-20")
    _, skipped, _ = run(build_dag("hf_none", files=ggufs(tmp_path, "x"), version="1", when=T1, hf=None))
    assert {t: s for t, (s, _) in skipped.items()} == {"publish": "skipped", "space_ready": "skipped"}


def test_bad_token_fails_publish_at_once_with_the_fix(hf_env, tmp_path, monkeypatch):
    from operators.operators.hf_space import HFSpaceDeployOperator

    hub = hf_env
    monkeypatch.setenv("AIRFLOW_CONN_HUGGINGFACE_DEFAULT", json.dumps(
        {"conn_type": "generic", "host": hub.url, "password": "hf_wrong_0123456789"}))
    op = HFSpaceDeployOperator(task_id="publish", model=MODEL, ggufs=ggufs(tmp_path, "a"),
                               adapter={"version": "1", "time": T1}, settings=settings(hub))

    with pytest.raises(AirflowFailException) as caught:
        op.execute({})
    text = str(caught.value)
    assert "HTTP 401" in text and "Invalid credentials" in text and "'write' role" in text
    assert "hf_wrong_0123456789" not in text and hub.repos == {}
    # huggingface_hub follows a refused create with one repo read; neither is retried (max_retries=2)
    assert hub.responses == [("POST", "/api/repos/create", 401), ("GET", f"/api/models/{hub.user}/{MODEL}-GGUF", 401)]


def published(hub: Any, **over: Any) -> dict[str, Any]:
    return {"space_id": f"{hub.user}/{MODEL}-chat", "space_url": f"{hub.url}/spaces/{hub.user}/{MODEL}-chat",
            "main_moved": True, **over}


def make_space(hub: Any, tmp_path: Path) -> None:
    """Publish once so the Space exists (its runtime then walks hub.space_build_stages)."""
    from include.hub.publish import HubTarget, publish_model

    publish_model(model=MODEL, version="1", target=HubTarget(
        repo_id=f"{hub.user}/{MODEL}-GGUF", space_id=f"{hub.user}/{MODEL}-chat", private=False, token=hub.token,
        endpoint=hub.url), ggufs=ggufs(tmp_path, "s"), card={}, adapter_time=T1)


def sensor(hub: Any, **over: Any) -> Any:
    from operators.sensors.hf_space import HFSpaceRuntimeSensor

    return HFSpaceRuntimeSensor(task_id="space_ready", model=MODEL, published=published(hub),
                                settings=settings(hub, **over.pop("settings", {})), **over)


def test_deferrable_sensor_defers_with_a_serializable_trigger_without_the_token(hf_env, tmp_path):
    hub = hf_env
    hub.space_build_stages = ["BUILDING", "BUILDING", "RUNNING"]
    make_space(hub, tmp_path)

    with pytest.raises(TaskDeferred) as deferred:  # its own first read sees BUILDING: it defers
        sensor(hub, settings={"deferrable": True}).execute({})

    assert deferred.value.method_name == "execute_complete"
    path, kwargs = deferred.value.trigger.serialize()
    assert path == "operators.triggers.hf_space.HFSpaceRuntimeTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs and hub.token not in json.dumps(kwargs)
    event = asyncio.run(first_event(HFSpaceRuntimeTrigger(**kwargs)))
    assert event["status"] == "running" and event["stage"] == "RUNNING" and event["polls"] == 2
    done = sensor(hub, settings={"deferrable": True}).execute_complete({}, event)
    assert done["stage"] == "RUNNING" and done["url"].endswith(f"/spaces/{hub.user}/{MODEL}-chat")


def test_deferrable_sensor_reads_once_before_deferring_and_needs_no_triggerer_for_a_running_space(hf_env, tmp_path):
    hub = hf_env
    hub.space_build_stages = ["RUNNING"]
    make_space(hub, tmp_path)

    done = sensor(hub, settings={"deferrable": True}).execute({})  # no TaskDeferred: the Space already runs

    assert done["stage"] == "RUNNING" and done["space_id"] == f"{hub.user}/{MODEL}-chat"


async def first_event(trigger: HFSpaceRuntimeTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger yielded no event")


def trigger(hub: Any, **over: Any) -> HFSpaceRuntimeTrigger:
    return HFSpaceRuntimeTrigger(**{"space_id": f"{hub.user}/{MODEL}-chat", "conn_id": "huggingface_default",
                                    "endpoint": None, "timeout_s": 5.0, "poke_interval_s": 0.1, **over})


def test_trigger_reports_an_error_stage_with_its_message_and_times_out(hf_env, tmp_path):
    hub = hf_env
    hub.space_build_stages = ["BUILDING", "RUNTIME_ERROR"]
    hub.space_error_message = "ValueError: MODEL_FILE not found"
    make_space(hub, tmp_path)

    error = asyncio.run(first_event(trigger(hub)))
    assert (error["status"], error["stage"], error["message"]) == ("error", "RUNTIME_ERROR",
                                                                    "ValueError: MODEL_FILE not found")
    with pytest.raises(AirflowFailException, match=r"is RUNTIME_ERROR: ValueError: MODEL_FILE not found\. Fix"):
        sensor(hub).execute_complete({}, error)

    hub.repo(f"{hub.user}/{MODEL}-chat", "space").stages = ["BUILDING"]  # a build that never ends
    timeout = asyncio.run(first_event(trigger(hub, timeout_s=0.5)))
    assert timeout["status"] == "timeout" and timeout["stage"] == "BUILDING" and timeout["polls"] >= 2
    waited = f"{timeout['waited_s']:.1f}".replace(".", r"\.")
    with pytest.raises(AirflowFailException, match=rf"did not reach RUNNING within 10 s \(waited {waited} s; last "
                                                   r"stage 'BUILDING'\)"):
        sensor(hub).execute_complete({}, timeout)


def test_poking_sensor_fails_at_once_on_build_error(hf_env, tmp_path):
    hub = hf_env
    hub.space_build_stages = ["BUILDING", "BUILD_ERROR"]
    hub.space_error_message = "pip install failed"
    make_space(hub, tmp_path)
    waiting = sensor(hub)

    assert waiting.poke({}) is False
    with pytest.raises(AirflowFailException, match="is BUILD_ERROR: pip install failed"):
        waiting.poke({})


@pytest.mark.parametrize(("record", "reason"), [
    (None, "model 'majora' has no `hf` section: no Space to wait for"),
    ({"space_id": None, "main_moved": True}, "model 'majora' has no Space: nothing to wait for"),
    ({"space_id": "a/b"}, "model 'majora': main did not move (backfill or no-op): the Space was not changed"),
])
def test_sensor_skips_without_a_space_or_when_main_did_not_move(hf_env, record, reason):
    from operators.sensors.hf_space import HFSpaceRuntimeSensor

    with pytest.raises(AirflowSkipException) as skipped:
        HFSpaceRuntimeSensor(task_id="s", model=MODEL, published=record or {}, settings=None if record is None
                             else settings(hf_env)).execute({})
    assert str(skipped.value) == reason
    assert hf_env.requests == []


def test_publish_without_a_token_names_the_connection_and_hf_token(hub, tmp_path, monkeypatch, airflow_db):
    from operators.operators.hf_space import HFSpaceDeployOperator

    monkeypatch.delenv("AIRFLOW_CONN_HF_MISSING_CONN", raising=False)
    op = HFSpaceDeployOperator(task_id="publish", model=MODEL, ggufs=ggufs(tmp_path, "a"),
                               adapter={"version": "1", "time": T1}, settings=settings(hub, conn_id="hf_missing_conn"))

    with pytest.raises(AirflowFailException, match=r"model 'majora': no Hugging Face token: connection "
                                                   r"'hf_missing_conn' has no password and HF_TOKEN is unset"):
        op.execute({})
    assert hub.requests == []


def test_trigger_without_a_token_ends_with_an_error_event(hub, monkeypatch, airflow_db):
    monkeypatch.delenv("AIRFLOW_CONN_HF_NOPE", raising=False)

    event = asyncio.run(first_event(trigger(hub, conn_id="hf_nope", endpoint=hub.url)))

    assert event["status"] == "error" and "connection 'hf_nope' has no password" in event["message"]
    with pytest.raises(AirflowFailException, match=r"ended the wait at stage None: .*no Hugging Face token"):
        sensor(hub).execute_complete({}, event)
    assert hub.requests == []
