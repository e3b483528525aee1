"""Slack messages of deploy and rollback runs, built from the stages' XCom records (formatting only; no sending).

Every message starts with the model and the version so a channel full of them stays scannable; then the
figures a reader acts on: file sizes and real bits per weight, perplexity against f16 when the gate ran,
health latency and tokens/s, where the version went (LM Studio current or not, Hugging Face links), and
the Airflow run. A failure names the failed stage and links its log; after an automatic rollback it says
which version is serving again and why.
"""

from __future__ import annotations

from typing import Any

from include.units import format_bytes


def _quant_line(item: dict[str, Any]) -> str:
    parts = [f"• `{item['quant']}` {format_bytes(item['bytes'])}"]
    if item.get("bits_per_weight"):
        parts.append(f"{item['bits_per_weight']:.2f} bpw")
    if item.get("ppl_ratio"):
        parts.append(f"perplexity x{item['ppl_ratio']:.3f} vs f16")
    return ", ".join(parts)


def _health_line(health: dict[str, Any], label: str) -> str | None:
    if not health or health.get("skipped") or health.get("latency_s") is None:
        return None
    return (f"{label}: {health['latency_s']:.2f} s latency, {health.get('tokens_per_s') or 0:.1f} tokens/s"
            + (f" — “{health['answer_excerpt'][:80]}”" if health.get("answer_excerpt") else ""))


def is_noop(records: dict[str, Any]) -> bool:
    """Whether the run only planned (a dry run, or an unattended run whose adapter was already deployed)."""
    plan = records.get("plan") or {}
    return bool(plan) and not records.get("download")


def _lmstudio_line(version: str, install: dict[str, Any], promote: dict[str, Any]) -> str | None:
    """What the ledger did with the version: promoted, nothing (already current), or installed but not current."""
    if promote.get("promoted"):
        was = f" (was `{promote['previous']}`)" if promote.get("previous") else ""
        return f"LM Studio: `{version}` is now current{was}"
    if promote and promote.get("previous") == version:
        return f"LM Studio: `{version}` was already current" + (
            " with the same files: nothing changed" if install.get("noop") else "")
    if promote:
        installed = "already installed with the same files" if install.get("noop") else "installed"
        return f"LM Studio: {installed}, not made current ({promote.get('reason')})"
    return None


def success_text(model: str, run_url: str | None, records: dict[str, Any]) -> str:
    """The message for a successful deploy: version, quant files, health figures, promotion, links."""
    adapter = records.get("download") or {}
    version = adapter.get("version") or (records.get("plan") or {}).get("version", "?")
    lines = [f":white_check_mark: *{model}* deployed adapter `{version}`"
             + (f" ({adapter['time']})" if adapter.get("time") else "")]
    for item in (records.get("ggufs") or {}).get("files", []):
        lines.append(_quant_line(item))
    line = _lmstudio_line(version, records.get("install") or {}, records.get("promote") or {})
    if line:
        lines.append(line)
    for key, label in (("health", "live"), ("smoke", "smoke test")):
        line = _health_line(records.get(key) or {}, label)
        if line:
            lines.append(line)
            break
    publish = records.get("publish") or {}
    if publish.get("repo_url"):
        tag = f" (tag `{publish['tag']}`)" if publish.get("tag") else ""
        space = f" | Space: {publish['space_url']}" if publish.get("space_url") else ""
        lines.append(f"Hugging Face: {publish['repo_url']}{tag}{space}")
    if run_url:
        lines.append(f"Airflow run: {run_url}")
    return "\n".join(lines)


def rollback_success_text(model: str, run_url: str | None, records: dict[str, Any]) -> str:
    """The message for a manual promote/rollback run that ended healthy."""
    promote = records.get("promote") or {}
    lines = [f":leftwards_arrow_with_hook: *{model}*: `{promote.get('version', '?')}` is now current in LM Studio"
             + (f" (was `{promote['previous']}`)" if promote.get("previous") else "")]
    line = _health_line(records.get("health") or {}, "live")
    if line:
        lines.append(line)
    if run_url:
        lines.append(f"Airflow run: {run_url}")
    return "\n".join(lines)


def failure_text(model: str, run_url: str | None, failed: list[tuple[str, str | None]], reason: str | None,
                 records: dict[str, Any] | None = None) -> str:
    """The message for a failed run: the failed stage and its log, the rollback if one happened, the run."""
    records = records or {}
    version = (records.get("download") or records.get("plan") or records.get("promote") or {}).get("version")
    lines = [f":x: *{model}* deploy" + (f" of `{version}`" if version else "") + " failed"
             + (f": {reason}" if reason else "")]
    rollback = records.get("rollback") or {}
    named = {task_id for task_id, _ in failed}
    for task_id in rollback.get("failed_stages") or []:
        if task_id not in named and task_id != "rollback":
            failed = [(task_id, None), *failed]
    for task_id, log_url in failed:
        lines.append(f"• stage `{task_id}` failed" + (f", log: {log_url}" if log_url else ""))
    if rollback.get("restored_version"):
        lines.append(f":leftwards_arrow_with_hook: rolled back: `{rollback['restored_version']}` is current again "
                     f"(`{rollback.get('failed_version')}` failed: {rollback.get('reason')})")
    elif rollback:
        why = rollback.get("reason") or "an earlier stage failed"
        lines.append(f"LM Studio unchanged (nothing was made current): {why}")
    if run_url:
        lines.append(f"Airflow run: {run_url}")
    return "\n".join(lines)
