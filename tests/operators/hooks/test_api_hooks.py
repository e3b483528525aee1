"""VastAIHook and HuggingFaceHook: the key/token and endpoint from an Airflow connection (or the environment),
handed to the real clients, which talk to the stand-ins; the async path a trigger uses reads the same."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import pytest

from include.errors import PublishError, VastAIError
from operators.hooks.huggingface import HuggingFaceHook
from operators.hooks.slack import SlackNotifyHook
from operators.hooks.vastai import VastAIHook
from tests.stand_ins.vastai import VastAIStandIn


@pytest.fixture
def vast(monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.delenv("VAST_URL", raising=False)
    with VastAIStandIn() as stand_in:
        stand_in.add_instance("31337", ssh_host="ssh4.vast.invalid", ssh_port=40022)
        yield stand_in


def test_vastai_key_and_url_come_from_the_connection(vast, monkeypatch, airflow_db) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_VAST_TEAM", vast.airflow_conn())
    hook = VastAIHook("vast_team")

    instance = hook.running_instance("31337")

    assert (instance.ssh_host, instance.ssh_port) == ("ssh4.vast.invalid", 40022)
    assert vast.requests[-1]["authorization"] == f"Bearer {vast.api_key}"
    assert hook.has_credentials() and vast.api_key not in repr(hook.get_conn())


def test_vastai_env_stands_in_for_a_missing_connection(vast, monkeypatch, airflow_db) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_VAST_NONE", raising=False)
    hook = VastAIHook("vast_none", api_url=vast.url)
    assert not hook.has_credentials()
    with pytest.raises(VastAIError, match=r"no Vast\.ai API key"):
        hook.get_conn()

    monkeypatch.setenv("VAST_API_KEY", vast.api_key)
    assert hook.has_credentials() and hook.running_instance("31337").ssh_port == 40022


def test_hub_token_and_endpoint_from_the_connection_sync_and_async(hub, monkeypatch, airflow_db) -> None:
    parts = urlsplit(hub.url)
    monkeypatch.setenv("AIRFLOW_CONN_HF_TEAM", json.dumps({"conn_type": "generic", "host": parts.hostname,
                                                           "schema": "http", "port": parts.port,
                                                           "password": hub.token}))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hook = HuggingFaceHook("hf_team")

    credentials = hook.get_credentials()
    assert credentials.endpoint == hub.url and credentials.token == hub.token
    assert hub.token not in repr(credentials)
    assert asyncio.run(hook.aget_credentials()) == credentials
    assert hook.get_conn().whoami()["name"] == hub.user  # the real client, authenticated, at the stand-in
    assert hook.get_conn(endpoint="http://127.0.0.1:9").endpoint == "http://127.0.0.1:9"


def test_hub_token_falls_back_to_hf_token_else_names_the_fix(hub, monkeypatch, airflow_db) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_HF_NONE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hook = HuggingFaceHook("hf_none")
    assert not hook.has_credentials()
    with pytest.raises(PublishError, match=r"connection 'hf_none' has no password and HF_TOKEN is unset.*Fix: "
                                           r"create the connection 'hf_none'"):
        asyncio.run(hook.aget_credentials())

    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert hook.has_credentials()
    assert hook.get_credentials().endpoint == hub.url and hook.get_conn().whoami()["name"] == hub.user


def test_slack_connection_check_is_a_hook_method(slack, monkeypatch, airflow_db) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_NOPE", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_TEAM", slack.airflow_conn())
    assert SlackNotifyHook.connection_exists("slack_team")
    assert not SlackNotifyHook.connection_exists("slack_nope")
    SlackNotifyHook(slack_webhook_conn_id="slack_team").send(text="hello from the hook")
    assert [m["text"] for m in slack.messages] == ["hello from the hook"]
