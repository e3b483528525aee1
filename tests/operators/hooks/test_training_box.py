"""TrainingBoxHook against the real sshd stand-in: one SSH connection (an ``AIRFLOW_CONN_...`` variable with
``key_file`` and ``host_key`` extras) works the same through the SSH provider's SSHHook and through ours, and ours
keeps the secure, fast defaults: host keys always checked, no compression, TCP_NODELAY."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.ssh.hooks.ssh import SSHHook

from include.errors import ConfigError, SourceError
from operators.hooks.training_box import TrainingBoxHook
from operators.hooks.vastai import VastAIHook
from tests.stand_ins.vastai import VastAIStandIn

# Another box's host key (a valid ed25519 key that the stand-in does not have).
WRONG_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME without ~/.ssh: no known_hosts, no ssh config, no default keys."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def connection(monkeypatch: pytest.MonkeyPatch, sshd: Any, conn_id: str = "training_box", *, drop: tuple[str, ...] = (),
               **extra: Any) -> str:
    """Set ``AIRFLOW_CONN_<ID>`` to the stand-in's connection (key_file and host_key extras), changed as asked."""
    conn = json.loads(sshd.airflow_conn())
    conn["extra"] = {k: v for k, v in {**conn["extra"], **extra}.items() if k not in drop and v is not None}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def run(client: Any, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=10)
    return stdout.read().decode().strip()


def test_one_connection_works_through_the_ssh_provider_and_through_the_hook(sshd, home, monkeypatch) -> None:
    conn_id = connection(monkeypatch, sshd, drop=("compress", "look_for_keys"))  # only key_file and host_key

    provider = SSHHook(ssh_conn_id=conn_id)
    ours = TrainingBoxHook(conn_id)
    with provider.get_conn() as theirs:
        assert run(theirs, "echo $USER") == sshd.user
    client = ours.get_conn()
    try:
        assert run(client, "echo $USER") == sshd.user
        transport = client.get_transport()
        assert transport.remote_compression == "none" and transport.local_compression == "none"
        assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.close()
    assert provider.compress is True and ours.compress is False  # SSHHook compresses unless told not to
    endpoint = ours.rsync_endpoint()
    assert endpoint is not None and endpoint.host_key == sshd.host_key_line and endpoint.verify_host_key
    assert endpoint.key_file == str(sshd.client_key) and (endpoint.host, endpoint.port) == ("127.0.0.1", sshd.port)


def test_compression_only_when_the_connection_asks(sshd, home, monkeypatch) -> None:
    hook = TrainingBoxHook(connection(monkeypatch, sshd, compress="true"))
    client = hook.get_conn()
    try:
        assert client.get_transport().local_compression != "none"
    finally:
        client.close()


def test_a_wrong_pinned_host_key_is_refused_at_once(sshd, home, monkeypatch) -> None:
    hook = TrainingBoxHook(connection(monkeypatch, sshd, host_key=WRONG_HOST_KEY))

    with pytest.raises(SourceError, match=r"the host key of .*:\d+ does not match the expected one") as caught:
        hook.get_conn()
    assert caught.value.retryable is False and "ssh-keyscan" in (caught.value.fix or "")


@pytest.mark.parametrize("extra", ["no_host_key_check", "allow_host_key_change"])
def test_an_extra_alone_does_not_turn_the_host_key_check_off(sshd, home, monkeypatch, caplog, extra) -> None:
    conn_id = connection(monkeypatch, sshd, drop=("host_key",), **{extra: "true"})
    with caplog.at_level(logging.WARNING, logger="operators.hooks.training_box"):
        hook = TrainingBoxHook(conn_id)
    assert f"says {extra}, but host keys are still checked" in caplog.text
    assert "verify_host_key: false" in caplog.text

    with pytest.raises(SourceError, match=r"is unknown \(not pinned, not in ~/.ssh/known_hosts\)"):
        hook.get_conn()
    with SSHHook(ssh_conn_id=conn_id).get_conn() as theirs:  # the provider's hook would have skipped it
        assert run(theirs, "echo ok") == "ok"


def test_verify_host_key_false_in_the_config_skips_the_check(sshd, home, monkeypatch, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="operators.hooks.training_box"):
        hook = TrainingBoxHook(connection(monkeypatch, sshd, host_key=WRONG_HOST_KEY), verify_host_key=False)
    assert "host key checking is OFF" in caplog.text
    client = hook.get_conn()
    try:
        assert run(client, "echo ok") == "ok"
    finally:
        client.close()
    endpoint = hook.rsync_endpoint()
    assert endpoint is not None and endpoint.verify_host_key is False


def test_connection_mistakes_name_the_connection_and_the_fix(sshd, home, monkeypatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_BOX", raising=False)
    with pytest.raises(ConfigError, match=r"SSH connection 'no_such_box' does not exist.*AIRFLOW_CONN_NO_SUCH_BOX"):
        TrainingBoxHook("no_such_box")
    conn = json.loads(sshd.airflow_conn())
    del conn["host"]
    monkeypatch.setenv("AIRFLOW_CONN_HOSTLESS", json.dumps(conn))
    with pytest.raises(SourceError, match=r"connection 'hostless' has no host\. Fix: set the host"):
        TrainingBoxHook("hostless")
    with pytest.raises(SourceError, match=r"cannot be used: Unsupported SSH host key algorithm 'box\.example'.*"
                                          r"without the host name"):
        TrainingBoxHook(connection(monkeypatch, sshd, host_key=f"box.example {sshd.host_key_line}"))


def test_login_defaults_to_root_and_a_password_login_transfers_over_sftp(sshd, home, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_BARE", json.dumps({"conn_type": "ssh", "host": "127.0.0.1", "port": sshd.port,
                                                        "password": "secret"}))
    hook = TrainingBoxHook("bare")
    assert hook.username == "root" and hook.password == "secret"
    assert hook.rsync_endpoint() is None  # ssh in BatchMode cannot type a password: the source falls back to SFTP


def test_a_vastai_instance_gives_host_and_port_the_connection_gives_the_keys(sshd, home, monkeypatch) -> None:
    conn = json.loads(sshd.airflow_conn())
    conn["host"], conn["port"] = "placeholder.invalid", 1  # the instance's endpoint replaces them
    monkeypatch.setenv("AIRFLOW_CONN_VAST_SSH", json.dumps(conn))
    with VastAIStandIn() as vast:
        monkeypatch.setenv("AIRFLOW_CONN_VASTAI_DEFAULT", vast.airflow_conn())
        vast.add_instance("31337", ssh_host="127.0.0.1", ssh_port=sshd.port)
        hook = TrainingBoxHook("vast_ssh", vastai=VastAIHook(), instance_id="31337")
    assert (hook.remote_host, hook.port, hook.where) == ("127.0.0.1", sshd.port, "vast.ai instance 31337")
    with hook.open_source(str(home), "*", "sftp") as source:
        assert source.description == f"vast.ai instance 31337:{home}"
        assert source.list_checkpoints() == []
