"""Extra links of the publish task: buttons to the Hugging Face model repo and the Space in the task's UI.

Airflow 3 computes each link once in the worker when the task ends (``get_link`` with the task instance as
``ti_key``) and stores it as the XCom ``_link_<class name>``; the UI reads that XCom. Both links read the publish
record (the task's ``return_value`` XCom: ``repo_url``, ``space_url``); no record (skipped or failed task)
means no link. The classes are registered in the plugin ``plugins/lora_deploy_links.py``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink


def _record(ti_key: Any) -> dict[str, Any]:
    from airflow.sdk.execution_time.xcom import XCom

    value = XCom.get_value(ti_key=ti_key, key="return_value")
    return value if isinstance(value, dict) else {}


def _https(url: Any) -> str:
    """A link the UI may show: only http(s) URLs (nothing else from an XCom reaches an href)."""
    text = str(url or "")
    return text if text.startswith(("https://", "http://")) else ""


class HFModelRepoLink(BaseOperatorLink):
    """Link to the model repo (at the published tag when there is one)."""

    name = "Hugging Face model"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        """``<repo_url>/tree/<tag>`` from the publish record, or '' when there is none."""
        record = _record(ti_key)
        url = _https(record.get("repo_url"))
        return f"{url.rstrip('/')}/tree/{record['tag']}" if url and record.get("tag") else url


class HFSpaceLink(BaseOperatorLink):
    """Link to the Space serving the model."""

    name = "Hugging Face Space"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        """``space_url`` from the publish (or space_ready) record, or '' when there is none."""
        record = _record(ti_key)
        return _https(record.get("space_url") or record.get("url"))
