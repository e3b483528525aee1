"""VastAIDownloadOperator against the Vast.ai API stand-in and the real sshd: endpoint lookup, failures, dates."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.errors import VastAITransientError
from operators.operators.download import VastAIDownloadOperator
from tests.stand_ins.vastai import VastAIStandIn

INSTANCE = "31337"


@pytest.fixture
def vast(monkeypatch, sshd):
    with VastAIStandIn() as stand_in:
        monkeypatch.setenv("AIRFLOW_CONN_VASTAI_DEFAULT", stand_in.airflow_conn())
        # The SSH connection brings login, key and pinned host key; host and port come from the API.
        conn = json.loads(sshd.airflow_conn())
        conn["host"], conn["port"] = "placeholder.invalid", 1
        monkeypatch.setenv("AIRFLOW_CONN_VAST_SSH", json.dumps(conn))
        yield stand_in


@pytest.fixture
def box(tmp_path, demo_inputs):
    copy = tmp_path / "box"
    shutil.copytree(demo_inputs.training_box, copy)
    for checkpoint in demo_inputs.training_box.iterdir():
        mtime = checkpoint.stat().st_mtime
        os.utime(copy / checkpoint.name, (mtime, mtime))
    return copy


def operator(tmp_path, box, **kwargs):
    return VastAIDownloadOperator(task_id="download", model="demo", artifact_root=str(tmp_path / "store"),
                                  source_kind="vastai", instance_id=INSTANCE, ssh_conn_id="vast_ssh",
                                  remote_dir=str(box), **kwargs)


def context(run_type="manual", interval_end=None):
    return {"dag_run": SimpleNamespace(run_type=run_type), "data_interval_end": interval_end}


def test_instance_id_resolves_to_the_ssh_endpoint_and_downloads(tmp_path, box, vast, sshd):
    vast.add_instance(INSTANCE, ssh_host="127.0.0.1", ssh_port=sshd.port)
    record = operator(tmp_path, box).execute(context())
    assert record["version"] == "checkpoint-20" and record["selected_by"] == "newest"
    assert record["transfer"]["method"] in ("rsync", "sftp")
    assert [r["path"] for r in vast.requests] == [f"/api/v0/instances/{INSTANCE}/"]
    assert vast.api_key not in json.dumps(record)


def test_direct_public_port_wins_over_the_proxy(tmp_path, box, vast, sshd):
    vast.add_instance(INSTANCE, ssh_host="ssh9.vast.invalid", ssh_port=1, public_ip="127.0.0.1",
                      direct_port=sshd.port)
    record = operator(tmp_path, box, transfer="sftp").execute(context())
    assert record["transfer"]["method"] == "sftp"


def test_stopped_instance_fails_once_without_retrying(tmp_path, box, vast):
    vast.add_instance(INSTANCE, status="exited")
    with pytest.raises(AirflowFailException, match=r"model 'demo': Vast.ai instance 31337 is not running "
                                                   r"\(actual_status 'exited'\)"):
        operator(tmp_path, box).execute(context())
    assert len(vast.requests) == 1


def test_bad_api_key_fails_at_once(tmp_path, box, vast, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_VASTAI_DEFAULT", vast.airflow_conn(key="not-the-key-123"))
    vast.add_instance(INSTANCE)
    with pytest.raises(AirflowFailException, match="rejected the API key") as err:
        operator(tmp_path, box).execute(context())
    assert "not-the-key-123" not in str(err.value)


def test_api_outage_is_left_to_the_retry_policy(tmp_path, box, vast, monkeypatch):
    vast.add_instance(INSTANCE)
    vast.failures = [503] * 4
    op = operator(tmp_path, box)
    # the client's backoff, not the code under test
    monkeypatch.setattr("include.source.vastai.time.sleep", lambda s: None)
    with pytest.raises(VastAITransientError, match="HTTP 503"):
        op.execute(context())
    assert len(vast.requests) == 4


@pytest.mark.parametrize(("run_type", "expected"), [("backfill", "checkpoint-10"), ("scheduled", "checkpoint-10"),
                                                    ("manual", "checkpoint-20")])
def test_dated_runs_take_the_checkpoint_of_their_interval(tmp_path, box, vast, sshd, run_type, expected):
    vast.add_instance(INSTANCE, ssh_host="127.0.0.1", ssh_port=sshd.port)
    end = datetime(2026, 11, 1, 12, tzinfo=UTC)  # checkpoint-10: Nov 1, checkpoint-20: Nov 2
    record = operator(tmp_path, box).execute(context(run_type, end))
    assert record["version"] == expected


def test_conf_version_beats_the_date(tmp_path, box, vast, sshd):
    vast.add_instance(INSTANCE, ssh_host="127.0.0.1", ssh_port=sshd.port)
    record = operator(tmp_path, box, adapter_version="checkpoint-20").execute(
        context("backfill", datetime(2026, 11, 1, 12, tzinfo=UTC)))
    assert (record["version"], record["selected_by"]) == ("checkpoint-20", "conf")


def test_plain_ssh_connection_still_works(tmp_path, box, sshd, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_TRAINING_BOX", sshd.airflow_conn())
    op = VastAIDownloadOperator(task_id="download", model="demo", artifact_root=str(tmp_path / "store"),
                                source_kind="ssh", ssh_conn_id="training_box", remote_dir=str(box))
    assert op.execute(context())["version"] == "checkpoint-20"
