"""Slack callbacks of the deploy DAGs (they work under ``dag.test()`` and the real dag-processor).

A bare ``SlackWebhookNotifier`` as a DAG callback fails under ``dag.test()``; a function that builds the
notifier and calls ``notify()`` works in both, so that is what :func:`slack_callback` returns.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from include.notify import failure_text, is_noop, rollback_success_text, success_text

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # connection ids already reported missing in this process

STAGE_TASKS = ("plan", "download", "merge", "convert", "ggufs", "install", "smoke", "promote", "health", "publish",
               "space_ready")


def slack_callback(*, model: str, conn_id: str | None, success: bool) -> Callable[[Any], None]:
    """A DAG callback that posts the run's outcome for ``model`` to the Slack webhook ``conn_id``."""
    return functools.partial(_post, model=model, conn_id=conn_id, success=success)


def _post(context: Any, *, model: str, conn_id: str | None, success: bool) -> None:
    if not conn_id:
        log.info("Slack notifications are off for %s (notify.slack_conn_id is empty)", model)
        return
    from operators.hooks.slack import SlackNotifyHook

    if not SlackNotifyHook.connection_exists(conn_id):
        if conn_id not in _WARNED:
            _WARNED.add(conn_id)
            log.warning("no Slack connection %r: Slack notifications are skipped (create a slackwebhook connection "
                        "with the webhook URL as password to get them)", conn_id)
        return
    records = _records(context)
    dag_id = getattr(context.get("dag"), "dag_id", "") or ""
    if success and is_noop(records):
        log.info("%s: the run only planned (dry run or already deployed): no Slack message", model)
        return
    if not success:
        text = failure_text(model, _run_url(context), _failed(context), context.get("reason"), records)
    elif dag_id.startswith("rollback_"):
        text = rollback_success_text(model, _run_url(context), records)
    else:
        text = success_text(model, _run_url(context), records)
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text).notify(context)
    log.info("Slack notified (%s) for %s", "success" if success else "failure", model)


def _records(context: Any) -> dict[str, Any]:
    """Every stage's XCom record of this run (None for stages that pushed nothing)."""
    ti = context.get("ti")
    if ti is not None:
        try:
            records = {task_id: ti.xcom_pull(task_ids=task_id) for task_id in STAGE_TASKS}
            records["rollback"] = ti.xcom_pull(task_ids="rollback", key="rollback")
            return records
        except ImportError:
            pass  # dag.test() calls DAG callbacks with no task supervisor to ask: read the metadata DB instead.
    dag_run = context.get("dag_run")
    if dag_run is None:
        return {}
    return _records_from_db(dag_run.dag_id, dag_run.run_id)


def _records_from_db(dag_id: str, run_id: str) -> dict[str, Any]:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, key="return_value",
                                                  task_ids=list(STAGE_TASKS))).all()
        records = {row.task_id: XComModel.deserialize_value(row) for row in rows}
        for row in session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, key="rollback",
                                                      task_ids=["rollback"])).all():
            records["rollback"] = XComModel.deserialize_value(row)
        return records


def _failed(context: Any) -> list[tuple[str, str | None]]:
    ti = context.get("ti")
    if ti is None:
        return []
    return [(ti.task_id, getattr(ti, "log_url", None))]


def _run_url(context: Any) -> str | None:
    dag_run = context.get("dag_run")
    if dag_run is None:
        return None
    try:
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="http://localhost:8080").rstrip("/")
    except Exception:
        base = "http://localhost:8080"
    return f"{base}/dags/{dag_run.dag_id}/runs/{dag_run.run_id}"
