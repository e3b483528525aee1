"""One line per finished task for a terminal: the state, the duration and the one figure that matters.

``scripts/demo.py`` prints these as the deploy DAG's tasks finish, then :func:`run_summary`. The figures come
from each stage's XCom record (the contracts in DESIGN.md); a record this module does not know gives an empty
figure, never an error, so a new stage cannot break the demo's output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from include.units import format_bytes

Record = Any
STATE_WIDTH = 8
TASK_WIDTH = 16  # quantize[Q4_K_M]


def task_line(task: str, state: str, seconds: float | None, record: Record = None, error: str | None = None) -> str:
    """``"  convert      success   6.1 s  F16 3.4 MB; logits max|diff| 0.0063 (limit 1.0)"``.

    ``task`` is the task id with its map index when mapped (``quantize[1]``); ``error`` is the failure's message
    (its first line is shown) and replaces the figure.
    """
    took = f"{seconds:6.1f} s" if seconds is not None else " " * 8
    detail = _first_line(error) if error else stage_figure(task.split("[")[0], record)
    return f"  {task:{TASK_WIDTH}s} {state:{STATE_WIDTH}s}{took}  {detail}".rstrip()


def stage_figure(stage: str, record: Record) -> str:
    """The figure that matters for one stage's record; ``""`` when the record is empty or unknown."""
    figure = _FIGURES.get(stage)
    if figure is None or record in (None, {}, []):
        return ""
    try:
        return figure(record)
    except (KeyError, TypeError, ValueError, AttributeError):
        return ""  # an older or partial record: the line still shows state and duration


def run_summary(dag_id: str, state: str, seconds: float, records: Mapping[str, Record]) -> str:
    """The closing block: the run's state, where the GGUFs went, the smoke figures and what is current."""
    lines = [f"{dag_id} finished: {state} in {seconds:.1f} s"]
    plan = records.get("plan") or {}
    if plan.get("dry_run"):
        from include.plan import DeployPlan

        lines.append(DeployPlan.from_record(plan).text())
        lines.append("dry run: nothing was written")
    installed = (records.get("install") or {}).get("installed", [])
    if installed:
        lines.append("GGUFs installed for LM Studio:")
        lines.extend(f"  {item['quant']:7s} {format_bytes(item['bytes']):>9s}  {item['path']}" for item in installed)
    smoke = records.get("smoke") or {}
    if smoke.get("latency_s") is not None:
        free = smoke.get("disk_free_bytes") or {}
        lines.append(f"smoke test ({smoke.get('quant')}): {smoke['latency_s']:.2f} s latency, "
                     f"{smoke['tokens_per_s']:.1f} tokens/s, answer: {(smoke.get('answer_excerpt') or '')[:60]!r}")
        lines.append(f"free disk: models dir {format_bytes(free.get('models_dir', 0))}, artifact root "
                     f"{format_bytes(free.get('artifact_root', 0))}; free memory "
                     f"{format_bytes(smoke.get('mem_available_bytes') or 0)}")
    promote = records.get("promote")
    if promote:
        current = promote["version"] if promote["promoted"] else promote.get("previous")
        why = f" ({promote['reason']})" if promote["promoted"] or current != promote["version"] else ""
        lines.append(f"LM Studio current: {current}{why}")
    return "\n".join(lines)


def _first_line(text: str, limit: int = 160) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _reused(record: Mapping[str, Any]) -> str:
    return " (reused)" if record.get("reused") else ""


def _plan(record: Mapping[str, Any]) -> str:
    need = sum(int(d.get("need_bytes") or 0) for d in record.get("disk", []))
    peak = max((int(m.get("peak_bytes") or 0) for m in record.get("memory", [])), default=0)
    dry = "dry run; " if record.get("dry_run") else ""
    return (f"{dry}{record['version']} ({record['selected_by']}), {record['parameters'] / 1e6:,.1f}M parameters; "
            f"needs {format_bytes(need)} of disk, largest task ~{format_bytes(peak)}")


def _download(record: Mapping[str, Any]) -> str:
    transfer = record.get("transfer") or {}
    how = f" by {transfer['method']}" if transfer.get("method") not in (None, "none") else ""
    resumed = f", {format_bytes(transfer['resumed_bytes'])} resumed" if transfer.get("resumed_bytes") else ""
    return (f"{record['version']}: {len(record.get('files', []))} files, {format_bytes(record['bytes'])}{how}"
            f"{resumed}{_reused(record)}")


def _merge(record: Mapping[str, Any]) -> str:
    if record.get("backend") == "fused":
        return "adapter checked; its deltas are applied tensor by tensor during convert (fused)"
    tensors = f"{record['merged_tensors']} of {record['tensors']} tensors merged, " if record.get("tensors") else ""
    return f"{tensors}{format_bytes(record['bytes'])} {record.get('dtype', '')} ({record['backend']}){_reused(record)}"


def _convert(record: Mapping[str, Any]) -> str:
    base = record["base"]
    text = f"{base['quant']} {format_bytes(base['bytes'])}{_reused(base)}"
    fidelity = record.get("fidelity") or {}
    if fidelity.get("max_abs_diff") is not None:
        text += f"; logits max|diff| {fidelity['max_abs_diff']:.4g} (limit {fidelity['max_abs_diff_limit']:g})"
    comparison = (record.get("tokenizer") or {}).get("comparison") or {}
    if comparison.get("equal"):
        text += f"; tokenizer matches HF on {comparison['texts']} texts ({comparison['tokens']} tokens)"
    return text


def _quant_types(record: Sequence[str]) -> str:
    return ", ".join(record)


def _quantize(record: Mapping[str, Any]) -> str:
    text = f"{record['quant']} {format_bytes(record['bytes'])}, {record['bits_per_weight']:.2f} bits/weight"
    if record.get("ppl_ratio"):
        text += f", perplexity {100 * (record['ppl_ratio'] - 1):+.1f} % vs F16"
    return text + _reused(record)


def _ggufs(record: Mapping[str, Any]) -> str:
    files = record.get("files", [])
    return f"{len(files)} GGUFs of {record['version']}, {format_bytes(sum(f['bytes'] for f in files))}"


def _install(record: Mapping[str, Any]) -> str:
    if record.get("noop"):
        return f"{record['version']} already installed (same files): nothing to do"
    installed = record.get("installed", [])
    linked = sum(1 for item in installed if item.get("linked"))
    how = "hard links" if linked == len(installed) else f"{linked} hard links, {len(installed) - linked} copies"
    pruned = f"; pruned {', '.join(record['pruned'])}" if record.get("pruned") else ""
    return f"{len(installed)} GGUFs into {record['directory']} ({how}){pruned}"


def _health(record: Mapping[str, Any]) -> str:
    if record.get("skipped"):
        return f"skipped: {record['skipped']}"
    return (f"{record.get('quant')} at {record.get('endpoint')}: {record['latency_s']:.2f} s, "
            f"{record['tokens_per_s']:.0f} tokens/s")


def _promote(record: Mapping[str, Any]) -> str:
    if record["promoted"]:
        return f"{record['version']} is current ({record['reason']})"
    if record.get("previous") == record["version"]:
        return f"{record['version']} was already current"
    return f"{record['version']} installed, {record.get('previous')} stays current ({record['reason']})"


def _publish(record: Mapping[str, Any]) -> str:
    return f"{record['repo_id']} commit {str(record['commit'])[:8]}, tag {record['tag']}"


def _space_ready(record: Mapping[str, Any]) -> str:
    return f"{record['space_id']} {record['stage']} after {record['waited_s']:.0f} s"


def _retention(record: Mapping[str, Any]) -> str:
    verb = "would free" if record.get("dry_run") else "freed"
    count = record["removed_count"]
    return (f"{verb} {format_bytes(record['freed_bytes'])} ({count} path{'' if count == 1 else 's'}); kept "
            f"{format_bytes(record['kept_bytes'])}")


_FIGURES: dict[str, Callable[[Any], str]] = {
    "plan": _plan, "download": _download, "merge": _merge, "convert": _convert, "quant_types": _quant_types,
    "quantize": _quantize, "ggufs": _ggufs, "install": _install, "smoke": _health, "health": _health,
    "promote": _promote, "publish": _publish, "space_ready": _space_ready, "retention": _retention,
}
