"""Slack: the slack provider's webhook hook (the official one), plus the existence check the DAG callbacks need."""

from __future__ import annotations

from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook

from operators.hooks.base import ConnectionLookup


class SlackNotifyHook(ConnectionLookup, SlackWebhookHook):
    """``SlackWebhookHook`` unchanged (the connection's password is the incoming-webhook URL), with
    :meth:`connection_exists`: without the connection the callbacks log one line and skip, instead of failing."""
