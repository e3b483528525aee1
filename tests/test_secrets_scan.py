"""The secret scan (tests/secrets_scan.py) finds a secret planted in each place it reads, says where without
printing it, and fails when it read nothing."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest

from tests.secrets_scan import assert_no_secrets, mask, slack_secrets, ssh_key_secrets
from tests.stand_ins.hf_hub_state import Blob, Commit, HubState, Repo

DAG, RUN = "deploy_scan", "manual__2026-03-01T00:00:00+00:00"
OPENSSH_HEADER = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"


def fake_private_key() -> str:
    """An OpenSSH-shaped private key: the common header line, then random base64 lines."""
    body = base64.b64encode(secrets.token_bytes(200)).decode()
    lines = [OPENSSH_HEADER, *(body[i:i + 70] for i in range(0, len(body), 70))]
    return "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture
def place(tmp_path: Path) -> dict[str, Any]:
    """An Airflow home with one task log, a metadata DB with one XCom and one rendered-fields row, a Slack
    receiver with one message and a Hub with one commit: all clean. Returns the paths and stand-ins."""
    from airflow.models import import_all_models
    from airflow.models.base import Base
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from sqlalchemy import create_engine, insert
    from sqlalchemy.orm import Session

    home = tmp_path / "airflow"
    log = home / "logs" / f"dag_id={DAG}" / f"run_id={RUN}" / "task_id=publish" / "attempt=1.log"
    log.parent.mkdir(parents=True)
    log.write_text("publishing majora\npublished v-1\n")
    (home / "scheduler.log").write_text("scheduler started\n")
    import_all_models()
    db_url = f"sqlite:///{tmp_path / 'airflow.db'}"
    engine = create_engine(db_url)
    Base.metadata.create_all(engine, tables=[XComModel.__table__, RenderedTaskInstanceFields.__table__])
    with Session(engine) as session:
        session.execute(insert(XComModel).values(dag_run_id=1, task_id="publish", map_index=-1, key="return_value",
                                                 dag_id=DAG, run_id=RUN, value={"tag": "v-1"}))
        session.execute(insert(RenderedTaskInstanceFields).values(dag_id=DAG, task_id="publish", run_id=RUN,
                                                                  map_index=-1, rendered_fields={"model": "majora"}))
        session.commit()
    engine.dispose()
    hub = HubState("lora-tester", ())
    repo = Repo("lora-tester/majora-GGUF", "model", private=True)
    repo.commits.append(Commit("a" * 40, "publish v-1", "", "2026-03-01", {"README.md": Blob(b"# majora\n", False)}))
    hub.repos[("model", repo.repo_id)] = repo
    slack = SimpleNamespace(messages=[{"text": "majora v-1 deployed"}],
                            url="http://127.0.0.1:1/services/T0SCAN/B0SCAN/" + secrets.token_hex(12))
    return {"home": home, "log": log, "db_url": db_url, "hub": hub, "slack": slack, "repo": repo}


def scan(place: dict[str, Any], found: dict[str, str], **over: Any) -> Any:
    """Scan ``place`` for ``found`` (``over``: other arguments)."""
    return assert_no_secrets(found, **{"dag_ids": DAG, "run_ids": [RUN], "airflow_home": place["home"],
                                       "db_url": place["db_url"], "slack": place["slack"], "hub": place["hub"], **over})


def test_a_clean_scan_passes_and_reports_what_it_read(place):
    report = scan(place, {"Hub token": "hf_" + secrets.token_hex(16)})

    assert report.read == {"task log file": 1, "component log": 1, "XCom": 1, "rendered task fields": 1,
                           "Slack message": 1, "Hub commit": 1, "Hub file": 1, "Hub request URLs": 1}
    assert report.found == {}


def test_a_secret_planted_in_each_place_is_found_there_and_never_printed(place):
    token, vast_key, key_text = "hf_" + secrets.token_hex(16), "vast-" + secrets.token_hex(16), fake_private_key()
    key_secrets = ssh_key_secrets(key_text)
    key_line = next(iter(key_secrets.values()))
    slack = place["slack"]
    found = {"Hub token": token, "Vast.ai API key": vast_key, **key_secrets, **slack_secrets(slack.url)}
    with place["log"].open("a") as log:
        log.write(f"GET /whoami Authorization: Bearer {token}\n")
    (place["home"] / "scheduler.log").write_text(f"posting to {quote(slack.url, safe='')}\n")  # URL-quoted
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import Session

    engine = create_engine(place["db_url"])
    with Session(engine) as session:
        session.execute(update(XComModel).values(value={"tag": "v-1", "auth": f"Bearer {vast_key}"}))
        session.execute(update(RenderedTaskInstanceFields).values(rendered_fields={"key": key_text}))
        session.commit()
    engine.dispose()
    slack.messages.append({"text": f"see {slack.url}"})
    place["repo"].commits[0].files["app.py"] = Blob(f"TOKEN = {token!r}\n".encode(), False)

    with pytest.raises(AssertionError) as caught:
        scan(place, found)

    text = str(caught.value)
    assert "secrets leaked" in text
    sections = sections_of(text)
    assert sections[f"Hub token ({mask(token)})"].count("task log") == 1
    assert "attempt=1.log line 3: …GET /whoami Authorization: Bearer «Hub token»" in sections[
        f"Hub token ({mask(token)})"]
    assert "file app.py line 1: …TOKEN = '«Hub token»'" in sections[f"Hub token ({mask(token)})"]
    assert f"XCom {DAG}/{RUN}/publish[-1] key 'return_value'" in sections[f"Vast.ai API key ({mask(vast_key)})"]
    assert f"rendered fields of {DAG}/{RUN}/publish[-1]" in sections[f"SSH private key line 2 ({mask(key_line)})"]
    url_places = sections[f"Slack webhook URL ({mask(slack.url)})"]
    assert "component log" in url_places and "scheduler.log" in url_places and "Slack message #2" in url_places
    assert "Slack message #1" not in url_places
    for secret in found.values():
        for form in (secret, json.dumps(secret)[1:-1], quote(secret, safe="")):
            assert form not in text, "the failure printed a secret"


def sections_of(text: str) -> dict[str, str]:
    """``{"label (mask)": places}`` from a scan failure's message."""
    body = text.split("secrets leaked:\n", 1)[1].split("\nRead:", 1)[0]
    sections, label = {}, None
    for line in body.splitlines():
        if line.endswith(" found in:"):
            label = line.removesuffix(" found in:")
            sections[label] = ""
        elif label is not None:
            sections[label] += line + "\n"
    return sections


def test_a_scan_that_reads_nothing_fails(place, tmp_path):
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()

    with pytest.raises(AssertionError, match=r"read too little to prove anything: no task log text .*; 0 XComs"):
        assert_no_secrets({"Hub token": "hf_" + secrets.token_hex(16)}, dag_ids="no_such_dag",
                          airflow_home=empty_home, db_url=place["db_url"])
    with pytest.raises(AssertionError, match="no Slack message; no Hub commit"):
        scan(place, {"Hub token": "hf_" + secrets.token_hex(16)}, slack=SimpleNamespace(messages=[]),
             hub=HubState("u", ()))


def test_captured_output_counts_as_the_task_log_of_an_in_process_run(place, tmp_path):
    token = "hf_" + secrets.token_hex(16)
    empty_home = tmp_path / "dag-test-home"
    (empty_home / "logs").mkdir(parents=True)

    report = assert_no_secrets({"Hub token": token}, dag_ids=DAG, airflow_home=empty_home, db_url=place["db_url"],
                               captured={"stdout": "published v-1\n"})
    assert report.read["captured output"] == 1
    with pytest.raises(AssertionError, match=r"captured output 'stderr' line 2: …Bearer «Hub token»…"):
        assert_no_secrets({"Hub token": token}, dag_ids=DAG, airflow_home=empty_home, db_url=place["db_url"],
                          captured={"stderr": f"ok\nBearer {token}\n"})


def test_short_secrets_are_refused_and_key_and_webhook_secrets_are_the_distinctive_parts():
    with pytest.raises(AssertionError, match="would match by chance"):
        assert_no_secrets({"empty": ""}, dag_ids=DAG)
    key_text = fake_private_key()
    lines = list(ssh_key_secrets(key_text).values())
    assert lines and OPENSSH_HEADER not in lines and all("PRIVATE KEY" not in line for line in lines)
    assert slack_secrets("http://127.0.0.1:9/services/T1/B2/abcdef") == {
        "Slack webhook URL": "http://127.0.0.1:9/services/T1/B2/abcdef", "Slack webhook path token": "T1/B2/abcdef"}
    assert "hf_0" in mask("hf_0123456789abcdef0123") and "0123456789" not in mask("hf_0123456789abcdef0123")
