"""Slack messages of a deploy run, built from the stages' XCom records (formatting only; no sending)."""

from __future__ import annotations

from typing import Any


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def success_text(model: str, run_url: str | None, records: dict[str, Any]) -> str:
    """The message for a successful deploy: version, quant files with sizes, health figures, links."""
    adapter = records.get("download") or {}
    lines = [f":white_check_mark: *{model}* deployed adapter `{adapter.get('version', '?')}`"]
    for item in (records.get("install") or {}).get("installed", []):
        lines.append(f"• `{item['quant']}` {_size(item['bytes'])} -> `{item['identifier']}`")
    health = records.get("health") or {}
    if health:
        lines.append(f"health: {health.get('latency_s', 0):.2f} s latency, "
                     f"{health.get('tokens_per_s', 0):.1f} tokens/s")
    publish = records.get("publish") or {}
    if publish.get("repo_url"):
        lines.append(f"Hugging Face: {publish['repo_url']}" + (f" | Space: {publish['space_url']}"
                                                               if publish.get("space_url") else ""))
    if run_url:
        lines.append(f"Airflow run: {run_url}")
    return "\n".join(lines)


def failure_text(model: str, run_url: str | None, failed: list[tuple[str, str | None]], reason: str | None) -> str:
    """The message for a failed deploy: which stage failed, its log, and the run's reason."""
    lines = [f":x: *{model}* deploy failed" + (f": {reason}" if reason else "")]
    for task_id, log_url in failed:
        lines.append(f"• stage `{task_id}` failed" + (f": {log_url}" if log_url else ""))
    if run_url:
        lines.append(f"Airflow run: {run_url}")
    return "\n".join(lines)
