"""Every way a deploy starts, against a running Airflow: REST with conf, bad conf, backfill, asset consumers.

One Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor, SQLite) serves the whole module.
The training box holds three adapters dated on three days. A manual run deploys the newest; a backfill
over the three days then publishes the two older ones as their own versions without moving LM Studio's
current version backwards, and its last run (whose adapter is already deployed) ends at the plan task.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.airflow_services import airflow_services, wait_for
from tests.e2e.helpers import write_config
from tests.secrets_scan import assert_no_secrets, slack_secrets, sqlite_url

pytestmark = pytest.mark.e2e

DAG_ID = "deploy_modes"
# Adapter versions and the noon (UTC) of the day each was saved.
DATED = {"checkpoint-10": datetime(2026, 3, 1, 12, tzinfo=UTC), "checkpoint-20": datetime(2026, 3, 2, 12, tzinfo=UTC),
         "checkpoint-30": datetime(2026, 3, 3, 12, tzinfo=UTC)}

CONSUMER_DAG = '''
"""Test consumer: records every GGUF asset event it is triggered by."""
import json, os
from airflow.sdk import DAG, Asset, task

with DAG("gguf_consumer", schedule=[Asset(uri="lora-deploy://modes/gguf", name="modes_gguf")], catchup=False):
    @task
    def record(triggering_asset_events=None):
        events = [e.extra for evs in triggering_asset_events.values() for e in evs]
        with open(os.environ["CONSUMER_OUT"], "a") as out:
            out.write(json.dumps(events) + "\\n")
    record()
'''


@pytest.fixture(scope="module")
def box(tmp_path_factory, demo_inputs) -> Path:
    """A training box with three adapters dated on three days (the third made with another seed)."""
    from tests.fixtures.tiny_model import make_lora_adapter

    box = tmp_path_factory.mktemp("box")
    for name in ("checkpoint-10", "checkpoint-20"):
        shutil.copytree(demo_inputs.training_box / name, box / name)
    make_lora_adapter(demo_inputs.base, box / "checkpoint-30", seed=3)
    for name, when in DATED.items():
        os.utime(box / name, (when.timestamp(), when.timestamp()))
    return box


@pytest.fixture(scope="module")
def modes(tmp_path_factory, demo_inputs, box):
    """The running Airflow, with the deploy DAGs and a GGUF consumer DAG in its dags folder."""
    from tests.stand_ins.hf_hub import HubStandIn
    from tests.stand_ins.slack import SlackReceiver

    tmp = tmp_path_factory.mktemp("modes")
    dags = tmp / "dags"
    dags.mkdir()
    (dags / "deploy_models.py").symlink_to(ROOT / "dags" / "deploy_models.py")
    (dags / "gguf_consumer.py").write_text(CONSUMER_DAG)
    with HubStandIn() as hub, SlackReceiver() as slack:
        entry = {"base_model": str(demo_inputs.base), "source": {"kind": "local", "path": str(box)},
                 "schedule": "0 0 * * *", "quantize": {"types": ["Q8_0"]},
                 "lmstudio": {"models_dir": str(tmp / "lmstudio")},
                 "hf": {"repo_id": f"{hub.user}/modes-GGUF", "private": False}}
        config = write_config(tmp / "models.yaml", "modes", entry, tmp / "artifacts")
        services = airflow_services(tmp / "airflow", {
            "LORA_DEPLOY_CONFIG": str(config), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "CONSUMER_OUT": str(tmp / "consumer.jsonl"), "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp / "hf"),
            "AIRFLOW_CONN_HUGGINGFACE_DEFAULT": json.dumps({"conn_type": "generic", "host": hub.url,
                                                             "password": hub.token}),
            "AIRFLOW_CONN_SLACK_WEBHOOK_DEFAULT": slack.airflow_conn(),
        })
        services.start()
        try:
            wait_for(lambda: services.api("GET", "/dags/gguf_consumer").ok, timeout_s=180, what="the consumer DAG")
            services.api("PATCH", "/dags/gguf_consumer", json={"is_paused": False}).raise_for_status()
            yield {"airflow": services, "hub": hub, "slack": slack, "tmp": tmp}
        finally:
            services.stop()
        # Requests after the module's last test (while Airflow stops) escape the per-test check: assert them here.
        assert hub.unknown_routes == [] and slack.unknown_routes == []


@pytest.fixture(scope="module")
def newest_deployed(modes) -> str:
    """A manual run deploying the newest adapter (checkpoint-30), succeeded: its run id. Once per module, for
    every test that needs a deploy to have happened (so none depends on another test having run first)."""
    airflow = modes["airflow"]
    run_id = airflow.trigger(DAG_ID, {"adapter_version": "checkpoint-30"})
    assert airflow.wait_for_run(DAG_ID, run_id, timeout_s=600) == "success", task_states(airflow, run_id)
    return run_id


def ledger(tmp: Path) -> dict:
    return json.loads((tmp / "artifacts" / "modes" / "deployments.json").read_text())


def create_backfill(airflow, start: str, end: str) -> None:
    """``airflow backfill create`` as a user runs it. SQLite may refuse the CLI's write while the scheduler
    holds the lock ("database is locked"): then it is run again, unless the backfill exists by then."""
    errors = []
    for attempt in range(6):
        created = subprocess.run([sys.executable, "-m", "airflow", "backfill", "create", "--dag-id", DAG_ID,
                                  "--from-date", start, "--to-date", end], env=airflow.env, capture_output=True,
                                 text=True)
        if created.returncode == 0:
            return
        errors.append(created.stderr[-1500:])
        if airflow.api("GET", "/backfills", params={"dag_id": DAG_ID}).json().get("total_entries"):
            return
        time.sleep(2 + 2 * attempt)  # the scheduler's write transactions are short: back off and try again
    raise AssertionError("airflow backfill create failed 6 times:\n" + "\n---\n".join(errors))


def task_states(airflow, run_id: str) -> dict[str, str]:
    response = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    response.raise_for_status()
    return {ti["task_id"]: ti["state"] for ti in response.json()["task_instances"]}


def test_bad_conf_is_rejected_before_a_run_exists(modes):
    airflow = modes["airflow"]
    wait_for(lambda: airflow.api("GET", f"/dags/{DAG_ID}").ok, timeout_s=180, what=f"{DAG_ID} to be parsed")
    bad_confs = ({"quant_types": ["Q9_X"]}, {"targets": ["ftp"]}, {"adapter_version": "../etc"}, {"dry_run": "maybe"})
    for conf in bad_confs:
        response = airflow.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        assert response.status_code == 400, (conf, response.status_code, response.text)
    # Other tests of the module may have created runs already (any order): none of them carries a rejected conf.
    runs = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 100}).json()
    assert runs["total_entries"] == len(runs["dag_runs"])
    assert [r["conf"] for r in runs["dag_runs"]
            if any(bad.items() <= (r["conf"] or {}).items() for bad in bad_confs)] == []


def test_newest_then_backfill_of_older_versions_never_moves_current_back(modes, newest_deployed):
    airflow, tmp, hub = modes["airflow"], modes["tmp"], modes["hub"]
    assert ledger(tmp)["current"] == "checkpoint-30"

    # Runs of 03-02, 03-03, 03-04 (00:00 UTC) take the adapter newest at their data interval end.
    started = time.monotonic()
    create_backfill(airflow, "2026-03-02", "2026-03-04")

    def backfill_runs() -> list[dict] | None:
        runs = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"run_type": "backfill"}).json()["dag_runs"]
        done = [r for r in runs if r["state"] in ("success", "failed")]
        return runs if len(runs) == 3 and len(done) == 3 else None

    runs = wait_for(backfill_runs, timeout_s=900, what="the three backfill runs", interval_s=2)
    seconds = time.monotonic() - started
    assert all(r["state"] == "success" for r in runs), [(r["dag_run_id"], task_states(airflow, r["dag_run_id"]))
                                                        for r in runs]
    by_date = {r["logical_date"][:10]: r for r in runs}
    plans = {day: airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{r['dag_run_id']}/taskInstances/plan/xcomEntries/"
                                     "return_value").json()["value"] for day, r in by_date.items()}
    assert {day: p["version"] for day, p in plans.items()} == {
        "2026-03-02": "checkpoint-10", "2026-03-03": "checkpoint-20", "2026-03-04": "checkpoint-30"}

    # The run whose adapter was already deployed stopped at the plan: every other task skipped (but the retention
    # teardown, which collects the store in every run).
    states = task_states(airflow, by_date["2026-03-04"]["dag_run_id"])
    assert states.pop("plan") == "success" and states.pop("retention") == "success", states
    assert set(states.values()) == {"skipped"}, states

    # Older versions are installed and published under their own tags; current and main stay on the newest.
    book = ledger(tmp)
    assert book["current"] == "checkpoint-30"
    assert {"checkpoint-10", "checkpoint-20", "checkpoint-30"} <= set(book["versions"])
    repo = hub.repo(f"{hub.user}/modes-GGUF", "model")
    assert {"v-checkpoint-10", "v-checkpoint-20", "v-checkpoint-30"} <= set(repo.tags)
    print(f"backfill of 3 runs took {seconds:.0f} s")

    # The Hub token and the Slack webhook stay out of the task and component logs, the XComs and rendered fields
    # of all four runs, the Slack messages and everything uploaded to the Hub.
    run_ids = [newest_deployed, *(r["dag_run_id"] for r in runs)]
    report = assert_no_secrets({"Hub token": hub.token, **slack_secrets(modes["slack"].url)}, dag_ids=DAG_ID,
                               run_ids=run_ids, airflow_home=airflow.home, db_url=sqlite_url(airflow.home, airflow.env),
                               slack=modes["slack"], hub=hub)
    assert report.read["task log file"] >= 4 * 3, report.summary()


def test_gguf_asset_reaches_a_consumer_dag(modes, newest_deployed):
    out = modes["tmp"] / "consumer.jsonl"
    lines = wait_for(lambda: out.is_file() and out.read_text().splitlines(), timeout_s=240,
                     what="the consumer DAG to record a GGUF asset event")
    events = [e for line in lines for e in json.loads(line)]
    assert any(e["version"] == "checkpoint-30" and e["files"][0]["quant"] == "Q8_0" for e in events), events
