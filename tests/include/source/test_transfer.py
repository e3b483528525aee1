"""Transfers over a real OpenSSH server on 127.0.0.1: resume after a cut link, corrupt partials, reuse, host keys."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import pytest

from include.errors import SourceError, TransientSourceError
from include.source.download import download_adapter
from include.source.endpoint import SSHEndpoint, connect, ssh_command
from include.source.local import LocalSource
from include.source.ssh import SSHSource
from include.source.transfer import Progress
from include.store.artifacts import ArtifactStore
from include.store.hashing import sha256_file

BIG = 32 * 1024 * 1024
METHODS = ["rsync", "sftp"]


def make_checkpoint(directory: Path, weights: bytes, mtime: float = 1_790_000_000) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}\n')
    (directory / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n' * 50)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "optimizer.pt").write_bytes(b"x" * 1000)  # never fetched
    os.utime(directory, (mtime, mtime))
    return directory


@pytest.fixture(scope="module")
def weights() -> bytes:
    return os.urandom(BIG)


@pytest.fixture
def box(tmp_path, weights) -> Path:
    make_checkpoint(tmp_path / "box" / "checkpoint-100", weights)
    return tmp_path / "box"


@pytest.fixture
def endpoint(sshd) -> SSHEndpoint:
    return SSHEndpoint(host="127.0.0.1", port=sshd.port, user=sshd.user, key_file=str(sshd.client_key),
                       host_key=sshd.host_key_line)


def open_source(endpoint: SSHEndpoint, box: Path, method: str, **kwargs) -> SSHSource:
    return SSHSource(connect(endpoint), str(box), endpoint=endpoint, method=method, **kwargs)


def download(endpoint, box, store, method, **kwargs):
    source = open_source(endpoint, box, method)
    try:
        return download_adapter(source, store, "m", **kwargs)
    finally:
        source.close()
        source.client.close()


def staging_of(store: ArtifactStore, box: Path) -> Path:
    files = LocalSource(box).list_files("checkpoint-100")
    key = store.key_of({"files": [{"name": f.name, "bytes": f.bytes, "sha256": f.sha256} for f in files]})
    return store.staging_dir("m", "adapter", key)


def kill_sessions(sshd) -> None:
    """Kill the sshd children serving the open sessions (the master keeps listening)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == sshd.process.pid:
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.mark.parametrize("method", METHODS)
def test_happy_path_fetches_verifies_and_reports(tmp_path, box, endpoint, method, caplog, weights):
    store = ArtifactStore(tmp_path / "store")
    with caplog.at_level(logging.INFO, logger="include.source.transfer"):
        record = download(endpoint, box, store, method)
    assert record["version"] == "checkpoint-100" and record["selected_by"] == "newest"
    assert record["transfer"]["method"] == method
    assert record["transfer"]["received_bytes"] >= BIG and record["transfer"]["resumed_bytes"] == 0
    by_name = {f["name"]: f for f in record["files"]}
    assert set(by_name) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    assert by_name["adapter_model.safetensors"]["bytes"] == BIG
    assert sha256_file(Path(record["path"]) / "adapter_model.safetensors") == sha256_file(
        box / "checkpoint-100" / "adapter_model.safetensors")
    assert not staging_of(store, box).exists(), "the staging dir is removed once the output is stored"
    assert any("% of" in r.message and "MB/s" in r.message and "ETA" in r.message for r in caplog.records)


# Killing the link also ends paramiko's prefetch thread with an EOFError: expected here, not a test failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("method", METHODS)
def test_cut_link_resumes_and_resends_under_5_percent(tmp_path, box, endpoint, sshd, method):
    store = ArtifactStore(tmp_path / "store")
    partial = staging_of(store, box) / "adapter_model.safetensors"
    cut = threading.Event()

    def cutter() -> None:  # waits (polling the partial) until a quarter arrived, then kills the session
        while not cut.is_set():
            if partial.exists() and partial.stat().st_size >= BIG // 4:
                kill_sessions(sshd)
                cut.set()
            cut.wait(0.002)

    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    with pytest.raises(TransientSourceError) as err:
        download(endpoint, box, store, method)
    cut.set()
    thread.join()
    assert err.value.retryable
    kept = partial.stat().st_size
    assert BIG // 4 <= kept < BIG, "the partial file survives the failed attempt"

    record = download(endpoint, box, store, method)  # the retry
    transfer = record["transfer"]
    assert transfer["resumed_bytes"] == kept
    resent = transfer["received_bytes"] - (BIG - kept)
    assert resent < 0.05 * kept, f"re-sent {resent} of {kept} bytes already received"
    stored = Path(record["path"]) / "adapter_model.safetensors"
    assert sha256_file(stored) == sha256_file(box / "checkpoint-100" / "adapter_model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_flipped_byte_in_a_partial_is_detected_and_fetched_again(tmp_path, box, endpoint, method, weights, caplog):
    store = ArtifactStore(tmp_path / "store")
    staging = staging_of(store, box)
    staging.mkdir(parents=True)
    damaged = bytearray(weights[: BIG // 2])
    damaged[12345] ^= 0xFF
    (staging / "adapter_model.safetensors").write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        record = download(endpoint, box, store, method)
    stored = Path(record["path"]) / "adapter_model.safetensors"
    assert sha256_file(stored) == sha256_file(box / "checkpoint-100" / "adapter_model.safetensors")
    assert any("verification" in r.message or "does not match" in r.message for r in caplog.records), \
        [r.message for r in caplog.records]


def test_files_with_a_known_hash_are_not_fetched_again(tmp_path, box, endpoint, weights):
    store = ArtifactStore(tmp_path / "store")
    first = download(endpoint, box, store, "sftp")
    newer = make_checkpoint(box / "checkpoint-200", weights[::-1], mtime=1_790_100_000)
    (newer / "adapter_config.json").write_text((box / "checkpoint-100" / "adapter_config.json").read_text())
    second = download(endpoint, box, store, "sftp")
    assert second["version"] == "checkpoint-200" and second["path"] != first["path"]
    small = sum(f["bytes"] for f in second["files"] if f["name"] != "adapter_model.safetensors")
    assert second["transfer"]["received_bytes"] == BIG, f"only the new weights travel, not the {small} other bytes"


def test_remote_names_with_metacharacters_are_refused(tmp_path, box, endpoint):
    (box / "checkpoint-100" / "tokenizer$(touch pwned).json").write_text("{}")
    with pytest.raises(SourceError, match="refusing file") as err:
        download(endpoint, box, ArtifactStore(tmp_path / "store"), "rsync")
    assert not err.value.retryable
    assert not (Path.cwd() / "pwned").exists() and not (box / "checkpoint-100" / "pwned").exists()


def test_conf_version_with_a_path_is_refused(tmp_path, box, endpoint):
    with pytest.raises(SourceError, match="is not in"):
        download(endpoint, box, ArtifactStore(tmp_path / "store"), "rsync", version="../../etc")


def test_wrong_pinned_host_key_is_refused_by_both_clients(tmp_path, box, endpoint):
    import subprocess

    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pinned = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    wrong = SSHEndpoint(**{**endpoint.__dict__, "host_key": pinned})
    with pytest.raises(SourceError, match="does not match") as err:
        connect(wrong)
    assert not err.value.retryable
    with ssh_command(wrong) as argv:
        run = subprocess.run([*argv, "127.0.0.1", "true"], capture_output=True, text=True)
    assert run.returncode == 255 and "Host key verification failed" in run.stderr


def test_unknown_host_key_needs_an_explicit_opt_out(tmp_path, box, endpoint):
    unpinned = SSHEndpoint(**{**endpoint.__dict__, "host_key": None, "known_hosts": str(tmp_path / "empty")})
    with pytest.raises(SourceError, match="verify_host_key: false"):
        connect(unpinned)
    trusting = SSHEndpoint(**{**unpinned.__dict__, "verify_host_key": False})
    record = download(trusting, box, ArtifactStore(tmp_path / "store"), "rsync")
    assert record["version"] == "checkpoint-100"


def test_inline_private_key_goes_to_a_private_temp_file(endpoint, sshd):
    inline = SSHEndpoint(**{**endpoint.__dict__, "key_file": None, "private_key": sshd.client_key.read_text()})
    assert "PRIVATE" not in repr(inline)
    connect(inline).close()
    with ssh_command(inline) as argv:
        key_path = Path(argv[argv.index("-i") + 1])
        assert oct(key_path.stat().st_mode & 0o777) == "0o600"
        assert sshd.client_key.read_text().splitlines()[1] not in " ".join(argv)
    assert not key_path.exists()


def test_progress_lines_are_rate_limited():
    now = [0.0]
    lines: list[str] = []
    progress = Progress(100_000_000, "x", interval_s=5, clock=lambda: now[0])
    logger = logging.getLogger("include.source.transfer")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        for step in range(1, 101):
            now[0] = step * 0.1
            progress.update(step * 1_000_000)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert len(lines) == 2, lines  # at 5 s and 10 s, not per update
    assert lines[0] == "x:  50.0% of 100.0 MB, 10.0 MB/s, ETA 5 s"
