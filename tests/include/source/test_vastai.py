"""The Vast.ai client against the API stand-in on loopback: endpoints, clear errors, retries only when they help."""

from __future__ import annotations

import pytest

from include.errors import VastAIError, VastAITransientError
from include.source.vastai import VastAIClient, resolve_api_key, resolve_base_url, ssh_endpoint
from tests.stand_ins.vastai import VastAIStandIn


@pytest.fixture
def vast():
    with VastAIStandIn() as stand_in:
        yield stand_in


def client(vast, key=None, **kwargs):
    return VastAIClient(key or vast.api_key, vast.url, backoff_s=0, **kwargs)


def test_direct_port_is_preferred_like_the_cli(vast):
    vast.add_instance("111", ssh_host="ssh5.vast.ai", ssh_port=10444, public_ip="203.0.113.7", direct_port=40022)
    vast.add_instance("222", ssh_host="ssh5.vast.ai", ssh_port=10444)
    direct, proxied = client(vast).instance("111"), client(vast).instance(222)
    assert (direct.ssh_host, direct.ssh_port, direct.direct) == ("203.0.113.7", 40022, True)
    assert (proxied.ssh_host, proxied.ssh_port, proxied.direct) == ("ssh5.vast.ai", 10444, False)
    assert direct.running
    assert [r["path"] for r in vast.requests] == ["/api/v0/instances/111/", "/api/v0/instances/222/"]
    assert all(r["query"] == "owner=me" and r["authorization"] == f"Bearer {vast.api_key}" for r in vast.requests)


def test_unknown_instance_is_one_clear_request(vast):
    with pytest.raises(VastAIError, match="knows no instance '999'") as err:
        client(vast).instance("999")
    assert not err.value.retryable and len(vast.requests) == 1


def test_stopped_instance_names_its_status(vast):
    vast.add_instance("123", status="exited")
    with pytest.raises(VastAIError, match=r"not running \(actual_status 'exited'\)") as err:
        client(vast).running_instance("123")
    assert not err.value.retryable and "vastai start instance 123" in str(err.value)


def test_bad_key_fails_fast_without_leaking_it(vast):
    vast.add_instance("123")
    with pytest.raises(VastAIError, match="rejected the API key") as err:
        client(vast, key="wrong-secret-key").instance("123")
    assert not err.value.retryable and len(vast.requests) == 1
    assert "wrong-secret-key" not in str(err.value) and "wrong-secret-key" not in repr(client(vast, "wrong-secret-key"))


def test_transient_statuses_are_retried_with_backoff(vast):
    vast.add_instance("123")
    vast.failures = [429, 503, 500]  # the stand-in's 429 says Retry-After: 0
    waits: list[float] = []
    instance = VastAIClient(vast.api_key, vast.url, backoff_s=0.5, sleep=waits.append).instance("123")
    assert instance.running and len(vast.requests) == 4
    assert waits == [0.0, 1.0, 2.0]  # Retry-After honoured, else 0.5 s doubled per failed try


def test_each_retry_is_logged_without_the_key(vast, caplog):
    vast.add_instance("123")
    vast.failures = [502]
    caplog.set_level("WARNING")
    assert client(vast).instance("123").running
    assert "HTTP 502 reading instance 123 (attempt 1/4)" in caplog.text and vast.api_key not in caplog.text


def test_persistent_5xx_becomes_a_retryable_error(vast):
    vast.add_instance("123")
    vast.failures = [502, 502, 502]
    with pytest.raises(VastAITransientError, match="failed 3 times") as err:
        client(vast, attempts=3).instance("123")
    assert err.value.retryable and len(vast.requests) == 3


def test_unreachable_api_is_transient():
    with VastAIStandIn() as gone:
        url = gone.url
    with pytest.raises(VastAITransientError, match=r"failed 2 times.*ConnectError"):
        VastAIClient("k", url, attempts=2, backoff_s=0, timeout_s=2).instance("1")


def test_key_and_url_resolution(monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("VAST_URL", raising=False)
    with pytest.raises(VastAIError, match=r"no Vast\.ai API key"):
        resolve_api_key(None)
    monkeypatch.setenv("VAST_API_KEY", "from-env")
    assert resolve_api_key("") == "from-env" and resolve_api_key("from-conn") == "from-conn"
    assert resolve_base_url() == "https://console.vast.ai"
    monkeypatch.setenv("VAST_URL", "http://127.0.0.1:9/")
    assert resolve_base_url() == "http://127.0.0.1:9"
    assert resolve_base_url(connection_host="api.example") == "https://api.example"
    assert resolve_base_url("http://x:1", "api.example") == "http://x:1"


def test_instance_without_ssh_is_explained():
    with pytest.raises(VastAIError, match="publishes no SSH endpoint"):
        ssh_endpoint({"id": 5, "ports": {}})


def test_config_accepts_a_vastai_source_and_explains_mistakes():
    from include.config.loader import validate_model
    from include.errors import ConfigError

    entry = {"base_model": "/models/base", "source": {"kind": "vastai", "instance_id": 12345678,
                                                      "remote_dir": "/workspace/out/m"}}
    source = validate_model("m", entry).source
    assert (source.kind, source.instance_id, source.transfer, source.verify_host_key) == ("vastai", "12345678",
                                                                                         "auto", True)
    with pytest.raises(ConfigError, match=r"models\.m\.source\.instance_id.*numeric"):
        validate_model("m", {**entry, "source": {**entry["source"], "instance_id": "abc"}})
    with pytest.raises(ConfigError, match="shell metacharacters"):
        validate_model("m", {**entry, "source": {**entry["source"], "remote_dir": "/workspace/../etc"}})
    with pytest.raises(ConfigError, match="'local', 'ssh' or 'vastai'"):
        validate_model("m", {**entry, "source": {"kind": "scp"}})
