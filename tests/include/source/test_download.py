"""The download stage over a local directory and over a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import paramiko
import pytest

from include.errors import IntegrityError, SourceError
from include.source.download import download_adapter, select_checkpoint
from include.source.local import LocalSource
from include.source.ssh import SSHSource
from include.source.types import Checkpoint, SourceFile, check_name
from include.store.artifacts import ArtifactStore


@pytest.fixture
def box(tmp_path, demo_inputs) -> Path:
    """A private copy of the demo training box (tests may damage it)."""
    copy = tmp_path / "box"
    shutil.copytree(demo_inputs.training_box, copy)
    for checkpoint in demo_inputs.training_box.iterdir():
        stat = checkpoint.stat()
        os.utime(copy / checkpoint.name, (stat.st_atime, stat.st_mtime))
    return copy


def test_selects_the_newest_by_time_then_number():
    checkpoints = [Checkpoint("checkpoint-9", 5.0), Checkpoint("checkpoint-10", 5.0), Checkpoint("checkpoint-100", 1)]
    assert select_checkpoint(checkpoints, None, where="x").name == "checkpoint-10"
    assert select_checkpoint(checkpoints, "checkpoint-100", where="x").name == "checkpoint-100"


def test_unknown_version_lists_the_available_ones():
    with pytest.raises(SourceError) as err:
        select_checkpoint([Checkpoint("checkpoint-2", 1), Checkpoint("checkpoint-10", 2)], "checkpoint-3", where="box")
    assert "available: ['checkpoint-2', 'checkpoint-10']" in str(err.value)


def test_local_download_stores_verified_files_once(tmp_path, box):
    store = ArtifactStore(tmp_path / "store")
    record = download_adapter(LocalSource(box), store, "demo")
    assert record["version"] == "checkpoint-20" and not record["reused"]
    names = sorted(f["name"] for f in record["files"])
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    assert "trainer_state.json" not in names  # only what a deploy needs
    assert sorted(os.listdir(record["path"])) == sorted([*names, "manifest.json"])
    again = download_adapter(LocalSource(box), store, "demo")
    assert again["reused"] and again["path"] == record["path"]
    older = download_adapter(LocalSource(box), store, "demo", version="checkpoint-10")
    assert older["version"] == "checkpoint-10" and older["path"] != record["path"]


def test_missing_adapter_config_names_file_and_fix(tmp_path, box):
    (box / "checkpoint-20" / "adapter_config.json").unlink()
    with pytest.raises(SourceError) as err:
        download_adapter(LocalSource(box), ArtifactStore(tmp_path / "store"), "demo")
    assert "has no adapter_config.json" in str(err.value)
    assert "save_pretrained" in str(err.value)
    assert not (tmp_path / "store" / "demo").exists() or not any((tmp_path / "store" / "demo").rglob("*.json"))


def test_file_changed_after_hashing_is_caught_and_nothing_is_stored(tmp_path, box):
    class ChangedSource(LocalSource):
        def list_files(self, checkpoint):  # the box hashed an older version of the weights
            return [SourceFile(f.name, f.bytes, "0" * 64 if f.name == "adapter_model.safetensors" else f.sha256)
                    for f in super().list_files(checkpoint)]

    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(IntegrityError, match="twice") as err:
        download_adapter(ChangedSource(box), store, "demo")
    assert err.value.retryable
    assert not list((tmp_path / "store" / "demo" / "adapter").glob("*/manifest.json"))
    staged = [p.name for p in (tmp_path / "store" / "demo" / "adapter").glob(".partial-*/*")]
    assert "adapter_model.safetensors" not in staged, "a file that failed verification is not kept for resuming"


CHECKPOINT_TIMES = [("checkpoint-100", "2026-03-01T12:00:00+00:00"), ("checkpoint-200", "2026-03-05T12:00:00+00:00"),
                    ("checkpoint-300", "2026-03-09T12:00:00+00:00")]


@pytest.mark.parametrize(("interval_end", "expected"), [
    ("2026-03-04T00:00:00+00:00", "checkpoint-100"),
    ("2026-03-05T12:00:00+00:00", "checkpoint-200"),  # not newer than: equal counts
    ("2026-03-08T00:00:00+00:00", "checkpoint-200"),
    ("2026-04-01T00:00:00+00:00", "checkpoint-300"),
])
def test_backfill_takes_the_newest_checkpoint_of_its_interval(interval_end, expected):
    checkpoints = [Checkpoint(name, datetime.fromisoformat(t).timestamp()) for name, t in CHECKPOINT_TIMES]
    chosen = select_checkpoint(checkpoints, None, where="box", not_after=datetime.fromisoformat(interval_end))
    assert chosen.name == expected
    assert select_checkpoint(checkpoints, "checkpoint-300", where="box",
                             not_after=datetime.fromisoformat(interval_end)).name == "checkpoint-300"


def test_backfill_before_the_first_checkpoint_says_so():
    checkpoints = [Checkpoint(name, datetime.fromisoformat(t).timestamp()) for name, t in CHECKPOINT_TIMES]
    with pytest.raises(SourceError, match="no checkpoint in box existed at 2026-02-01") as err:
        select_checkpoint(checkpoints, None, where="box", not_after=datetime(2026, 2, 1, tzinfo=UTC))
    assert "'checkpoint-100'" in str(err.value) and not err.value.retryable


def test_dated_download_records_how_it_selected(tmp_path, box):
    # The demo's checkpoint-10 is from 2026-11-01 and checkpoint-20 from 2026-11-02.
    record = download_adapter(LocalSource(box), ArtifactStore(tmp_path / "store"), "demo",
                              not_after=datetime(2026, 11, 1, 12, tzinfo=UTC))
    assert (record["version"], record["selected_by"]) == ("checkpoint-10", "data_interval_end")
    assert record["time"].startswith("2026-11-01")


@pytest.mark.parametrize("name", ["..", "../etc", "a;rm -rf", "/abs", "x$(id)", ""])
def test_dangerous_names_are_refused(name):
    with pytest.raises(SourceError, match="refusing"):
        check_name(name, "file")


@pytest.fixture
def ssh_client(sshd):
    client = paramiko.SSHClient()
    host = f"[127.0.0.1]:{sshd.port}"
    key_type, key_data = sshd.host_key_line.split()
    client.get_host_keys().add(host, key_type, paramiko.PKey.from_type_string(key_type, base64.b64decode(key_data)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.0.1", port=sshd.port, username=sshd.user, key_filename=str(sshd.client_key),
                   look_for_keys=False, allow_agent=False)
    yield client
    client.close()


def test_ssh_download_hashes_on_the_box_and_matches_local(tmp_path, box, ssh_client):
    source = SSHSource(ssh_client, str(box))
    remote = download_adapter(source, ArtifactStore(tmp_path / "ssh-store"), "demo")
    local = download_adapter(LocalSource(box), ArtifactStore(tmp_path / "local-store"), "demo")
    source.close()
    assert remote["version"] == "checkpoint-20"
    assert remote["files"] == local["files"]
    assert remote["sha256"] == local["sha256"]


def test_ssh_missing_remote_dir_is_a_clear_error(tmp_path, ssh_client):
    source = SSHSource(ssh_client, str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="does not exist on the training box"):
        download_adapter(source, ArtifactStore(tmp_path / "store"), "demo")
