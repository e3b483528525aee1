"""install -> smoke -> promote -> health -> rollback in a real Airflow DAG (``dag.test()``) against the LM Studio
stand-in (real llama.cpp) and the stand-in ``lms``: deploy, promote, health failure and automatic rollback,
backfill, manual promotion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from include.lmstudio.ledger import read_ledger
from include.store.hashing import sha256_file
from tests.gguf_helpers import tiny_gguf

MODEL = "tiny"
TIMES = {"checkpoint-10": "2026-11-01T00:00:00+00:00", "checkpoint-20": "2026-11-02T00:00:00+00:00",
         "checkpoint-5": "2026-10-01T00:00:00+00:00"}


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Two real, different GGUFs standing for two adapter versions (both served as quant Q8_0)."""
    root = tmp_path_factory.getbasetemp() / "tiny-gguf"
    root.mkdir(exist_ok=True)
    files = {"checkpoint-10": tiny_gguf(root, "Q8_0"), "checkpoint-20": tiny_gguf(root, "Q4_K_M"),
             "checkpoint-5": tiny_gguf(root, "Q4_K_M")}
    return {v: {"quant": "Q8_0", "path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p),
                "bits_per_weight": 8.5} for v, p in files.items()}


def build_dag(dag_id: str, *, version: str, record: dict[str, Any], artifact_root: Path, lm: dict[str, Any],
              health: dict[str, Any], deferrable: bool = False) -> Any:
    """The deploy DAG's LM Studio part, wired as in dags/deploy_models.py."""
    from airflow.sdk import DAG, Param

    from operators.operators.lmstudio import LMStudioDeployOperator
    from operators.operators.promote import LMStudioPromoteOperator, LMStudioRollbackOperator
    from operators.sensors.health import HealthCheckSensor

    both = {**lm, **health}
    with DAG(dag_id, schedule=None, params={"promote": Param(False, type="boolean")}) as dag:
        install = LMStudioDeployOperator(task_id="install", model=MODEL, ggufs=[record],
                                         adapter={"version": version, "time": TIMES[version]},
                                         artifact_root=str(artifact_root), settings=lm)
        smoke = HealthCheckSensor(task_id="smoke", model=MODEL, installed=install.output, phase="smoke",
                                  settings=both, artifact_root=str(artifact_root))
        promote = LMStudioPromoteOperator(task_id="promote", model=MODEL, artifact_root=str(artifact_root),
                                          settings=lm, installed=install.output, promote="{{ params.promote }}")
        live = HealthCheckSensor(task_id="health", model=MODEL, installed=install.output, phase="live",
                                 settings=both, artifact_root=str(artifact_root), promoted=promote.output,
                                 deferrable=deferrable)
        rollback = LMStudioRollbackOperator(task_id="rollback", model=MODEL, artifact_root=str(artifact_root),
                                            settings=lm, promoted=promote.output)
        install >> smoke >> promote >> live
        [promote, live] >> rollback
    return dag


def register(dag: Any) -> None:
    """Serialize a DAG defined in a test into the metadata DB, as the dag-processor does for the dags folder
    (``dag.test()`` only creates runs of DAGs that are serialized)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.collection import update_dag_parsing_results_in_db
    from airflow.serialization.serialized_objects import LazyDeserializedDAG
    from airflow.utils.session import create_session

    with create_session() as session:
        DagBundlesManager().sync_bundles_to_db(session=session)
    with create_session() as session:
        update_dag_parsing_results_in_db("dags-folder", None, [LazyDeserializedDAG.from_dag(dag)], {}, None, set(),
                                         session=session)


def run(dag: Any, **conf: Any) -> tuple[str, dict[str, tuple[str, Any]]]:
    """Run the DAG; return its state and ``{task_id: (state, xcom)}``."""
    register(dag)
    dag_run = dag.test(run_conf=conf or None)
    out = {}
    for ti in dag_run.get_task_instances():
        key = "rollback" if ti.task_id == "rollback" else "return_value"
        out[ti.task_id] = (str(ti.state), ti.xcom_pull(task_ids=ti.task_id, key=key))
    return str(dag_run.state), out


@pytest.fixture
def env(lmstudio: Any, tmp_path: Path, airflow_db: None) -> dict[str, Any]:
    lm = {"home": None, "models_dir": None, "publisher": "acme", "repo": None, "endpoint": lmstudio.url,
          "keep_versions": 3, "context_length": 512, "gpu": "off", "lms_path": None, "identifier": None,
          "quant": None}
    health = {"prompt": "Say hello.", "system_prompt": "You are terse.", "max_tokens": 8, "min_answer_tokens": 1,
              "startup_timeout_s": 60, "max_latency_s": 30, "min_tokens_per_s": 0.5, "mode": "poke",
              "poke_interval_s": 1, "timeout_s": 20, "deferrable": False}
    stable = lmstudio.models_dir / "acme" / f"{MODEL}-GGUF" / f"{MODEL}-Q8_0.gguf"
    return {"lm": lm, "health": health, "root": tmp_path / "artifacts", "stable": stable, "stand_in": lmstudio}


def test_deploy_is_healthy_and_promoted_then_a_failing_version_is_rolled_back(env: dict, versions: dict) -> None:
    stand_in, stable, root = env["stand_in"], env["stable"], env["root"]
    state, tis = run(build_dag("lms_v1", version="checkpoint-10", record=versions["checkpoint-10"],
                               artifact_root=root, lm=env["lm"], health=env["health"]))
    assert state == "success", tis
    assert tis["rollback"][0] == "skipped"
    assert stable.read_bytes() == Path(versions["checkpoint-10"]["path"]).read_bytes()
    load = ["load", f"acme/{MODEL}-GGUF/{MODEL}-Q8_0.gguf", "--identifier", MODEL, "--context-length", "512",
            "--gpu", "off", "-y"]
    assert stand_in.calls() == [["unload", MODEL], load]
    assert stand_in.loads == [(MODEL, str(stable))]  # LM Studio loaded it just in time for the live check
    report = tis["health"][1]
    assert report["ok"] and report["phase"] == "live" and report["identifier"] == MODEL
    assert report["tokens_per_s"] >= 0.5 and report["answer_excerpt"] is not None
    assert report["disk_free_bytes"]["models_dir"] > 0 and report["mem_available_bytes"] > 0
    assert tis["smoke"][1]["endpoint"] == "ephemeral llama_cpp.server" and tis["smoke"][1]["ok"]
    ledger = read_ledger(root, MODEL)
    assert ledger["current"] == "checkpoint-10"
    assert [h["phase"] for h in ledger["versions"]["checkpoint-10"]["health"]] == ["smoke", "live"]

    # v2 passes the smoke test but LM Studio fails it live -> rollback to v1, the run fails
    stand_in.set_fail(MODEL, "error")
    state, tis = run(build_dag("lms_v2", version="checkpoint-20", record=versions["checkpoint-20"],
                               artifact_root=root, lm=env["lm"], health={**env["health"], "timeout_s": 3}))
    assert state == "failed"
    assert (tis["smoke"][0], tis["promote"][0], tis["health"][0], tis["rollback"][0]) == (
        "success", "success", "failed", "failed")
    assert tis["promote"][1]["promoted"] is True and tis["promote"][1]["previous"] == "checkpoint-10"
    assert stable.read_bytes() == Path(versions["checkpoint-10"]["path"]).read_bytes()  # byte-identical again
    assert tis["rollback"][1]["failed_version"] == "checkpoint-20"
    assert tis["rollback"][1]["restored_version"] == "checkpoint-10"
    assert "live check failed" in tis["rollback"][1]["reason"] and "HTTP 500" in tis["rollback"][1]["reason"]
    assert stand_in.calls()[-4:] == [["unload", MODEL], load, ["unload", MODEL], load]  # v2 loaded, then v1 again
    ledger = read_ledger(root, MODEL)
    assert (ledger["current"], ledger["versions"]["checkpoint-20"]["status"]) == ("checkpoint-10", "failed")
    last = ledger["events"][-1]
    assert (last["action"], last["version"], last["from_version"]) == ("rollback", "checkpoint-10", "checkpoint-20")
    assert "HTTP 500" in last["reason"]
    assert [e["action"] for e in ledger["events"]][-3:] == ["promote", "health_failed", "rollback"]


def test_backfill_never_becomes_current_unless_promoted(env: dict, versions: dict) -> None:
    root, stable = env["root"], env["stable"]
    assert run(build_dag("lms_new", version="checkpoint-10", record=versions["checkpoint-10"], artifact_root=root,
                         lm=env["lm"], health=env["health"]))[0] == "success"
    state, tis = run(build_dag("lms_old", version="checkpoint-5", record=versions["checkpoint-5"],
                               artifact_root=root, lm=env["lm"], health=env["health"]))
    assert state == "success"
    assert tis["promote"][1]["promoted"] is False and "not newer" in tis["promote"][1]["reason"]
    assert "not made current" in tis["health"][1]["skipped"]
    assert read_ledger(root, MODEL)["current"] == "checkpoint-10"
    assert stable.read_bytes() == Path(versions["checkpoint-10"]["path"]).read_bytes()
    # the same backfill with promote=true (the run's param) does become current, checked live (deferred)
    state, tis = run(build_dag("lms_old_forced", version="checkpoint-5", record=versions["checkpoint-5"],
                               artifact_root=root, lm=env["lm"], health=env["health"], deferrable=True),
                     promote=True)
    assert state == "success", tis
    assert tis["install"][1]["noop"] is True
    assert tis["promote"][1]["promoted"] is True and tis["health"][1]["ok"] is True
    assert read_ledger(root, MODEL)["current"] == "checkpoint-5"
    assert stable.read_bytes() == Path(versions["checkpoint-5"]["path"]).read_bytes()


def test_manual_promote_of_an_installed_version_and_unknown_versions(env: dict, versions: dict) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from operators.operators.promote import LMStudioPromoteOperator

    root = env["root"]
    for version in ("checkpoint-10", "checkpoint-20"):
        assert run(build_dag(f"lms_m_{version[-2:]}", version=version, record=versions[version], artifact_root=root,
                             lm=env["lm"], health=env["health"]))[0] == "success"
    back = LMStudioPromoteOperator(task_id="promote", model=MODEL, artifact_root=str(root), settings=env["lm"],
                                   version="checkpoint-10", promote=True)
    record = back.execute({})
    assert record["promoted"] is True and record["previous"] == "checkpoint-20"
    assert env["stable"].read_bytes() == Path(versions["checkpoint-10"]["path"]).read_bytes()
    # the promote record is also the live check's input in the rollback_<model> DAG
    from operators.sensors.health import HealthCheckSensor

    live = HealthCheckSensor(task_id="health", model=MODEL, installed=record, phase="live", promoted=record,
                             settings={**env["lm"], **env["health"]}, artifact_root=str(root))
    assert live.execute({})["ok"] is True
    assert read_ledger(root, MODEL)["versions"]["checkpoint-10"]["health"][-1]["phase"] == "live"
    unknown = LMStudioPromoteOperator(task_id="promote", model=MODEL, artifact_root=str(root), settings=env["lm"],
                                      version="checkpoint-99", promote=True)
    with pytest.raises(AirflowFailException, match=r"'checkpoint-99' is not installed; installed versions: "
                                                   r"\['checkpoint-10', 'checkpoint-20'\]"):
        unknown.execute({})
