"""The data behind the Deployments page: every model's versions, sizes and health, read from the ledgers.

Plain Python (no Airflow import): the plugin in ``plugins/lora_deploy_deployments.py`` serves these dicts as
JSON. Everything comes from ``<artifact_root>/<model>/deployments.json`` (see :mod:`include.lmstudio.ledger`) and the
config; nothing is recomputed (no hashing, no perplexity) when the page loads.

Three views, one per endpoint:

- :func:`list_models` - one summary per configured model (current/previous version, latest health, links);
- :func:`model_detail` - one model's versions, newest adapter first, with files, health and events;
- :func:`model_history` - the series for the charts (health and sizes per version, oldest first).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from include.config.model import LoadedConfig, ModelConfig
from include.errors import LoraDeployError, UnknownModelError
from include.lmstudio import ledger as L

HF = "https://huggingface.co"
HEALTH_KEYS = ("ok", "phase", "latency_s", "tokens_per_s", "completion_tokens", "answer_excerpt", "at", "endpoint")
FILE_KEYS = ("quant", "path", "bytes", "sha256", "bits_per_weight", "perplexity", "ppl_ratio")


def hf_links(model: ModelConfig, version: str | None = None) -> dict[str, str]:
    """Links to the model's Hugging Face repo (at tag ``v-<version>`` when given) and Space."""
    links: dict[str, str] = {}
    if model.hf is None:
        return links
    links["repo"] = f"{HF}/{model.hf.repo_id}"
    if version:
        links["version"] = f"{HF}/{model.hf.repo_id}/tree/v-{version}"
    if model.hf.space_id:
        links["space"] = f"{HF}/spaces/{model.hf.space_id}"
    return links


def _model(loaded: LoadedConfig, name: str) -> ModelConfig:
    model = loaded.models.get(name)
    if model is None:
        raise UnknownModelError(f"model {name!r} is not configured; configured models: {sorted(loaded.models)}")
    return model


def _read(loaded: LoadedConfig, name: str) -> tuple[dict[str, Any], str | None]:
    """The model's ledger and None, or an empty ledger and the error text when it is unreadable."""
    try:
        return L.read_ledger(loaded.settings.artifact_root, name), None
    except LoraDeployError as err:
        return L.empty_ledger(name), str(err)


def _health(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    return {key: report.get(key) for key in HEALTH_KEYS}


def _latest_health(entry: dict[str, Any]) -> dict[str, Any] | None:
    reports = entry.get("health") or []
    return _health(reports[-1]) if reports else None


def _ordered(ledger: dict[str, Any]) -> list[dict[str, Any]]:
    """Versions, oldest adapter first (by adapter time, then install time, then name)."""
    items = list(ledger.get("versions", {}).values())
    return sorted(items, key=lambda v: (v.get("adapter_time") or "", v.get("installed_at") or "", v["version"]))


def _file(record: dict[str, Any]) -> dict[str, Any]:
    return {key: record.get(key) for key in FILE_KEYS}


def _version(model: ModelConfig, ledger: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    name = entry["version"]
    files = [_file(f) for f in entry.get("files") or []]
    run_id = entry.get("dag_run_id")
    return {
        "version": name,
        "status": entry.get("status"),
        "is_current": ledger.get("current") == name,
        "is_previous": ledger.get("previous") == name,
        "adapter_time": entry.get("adapter_time"),
        "installed_at": entry.get("installed_at"),
        "dag_run_id": run_id,
        "dag_run_url": f"/dags/{model.dag_id}/runs/{quote(run_id, safe='')}" if run_id else None,
        "files": files,
        "total_bytes": sum(int(f["bytes"] or 0) for f in files),
        "health": _latest_health(entry),
        "health_reports": len(entry.get("health") or []),
        "hf": {**hf_links(model, name), **{k: v for k, v in (entry.get("hf") or {}).items() if isinstance(v, str)}},
    }


def _summary(loaded: LoadedConfig, model: ModelConfig) -> dict[str, Any]:
    ledger, error = _read(loaded, model.name)
    versions = ledger.get("versions", {})
    current = ledger.get("current")
    entry = versions.get(current) if current else None
    return {
        "model": model.name,
        "description": model.description,
        "current": current,
        "previous": ledger.get("previous"),
        "versions": len(versions),
        "installed": len(L.installed_versions(ledger)) if not error else 0,
        "current_health": _latest_health(entry) if entry else None,
        "current_bytes": sum(int(f.get("bytes") or 0) for f in entry.get("files") or []) if entry else None,
        "last_event": ledger["events"][-1] if ledger.get("events") else None,
        "deploy_dag_id": model.dag_id,
        "rollback_dag_id": f"rollback_{model.name}",
        "hf": hf_links(model),
        "error": error,
    }


def list_models(loaded: LoadedConfig, allowed: set[str] | None = None) -> dict[str, Any]:
    """``{"models": [summary, ...], "config_errors": {...}}`` for the configured models (``allowed`` only)."""
    names = sorted(n for n in loaded.models if allowed is None or n in allowed)
    return {"models": [_summary(loaded, loaded.models[n]) for n in names],
            "config_errors": {name: str(err) for name, err in sorted(loaded.errors.items())}}


def model_detail(loaded: LoadedConfig, name: str) -> dict[str, Any]:
    """One model's ledger for the page: versions newest first, with files, latest health, links and events."""
    model = _model(loaded, name)
    ledger, error = _read(loaded, name)
    versions = [_version(model, ledger, entry) for entry in reversed(_ordered(ledger))]
    return {**_summary(loaded, model), "error": error, "version_list": versions,
            "events": list(reversed(ledger.get("events") or []))}


def model_history(loaded: LoadedConfig, name: str) -> dict[str, Any]:
    """Chart series across versions (oldest first): health latency and tokens/s, and per-quant size, bpw, ppl.

    ``health`` holds every report (a version checked twice has two points); ``latency_s`` / ``tokens_per_s`` /
    ``total_bytes`` hold one value per version (its latest report); ``quants`` maps a quant to aligned lists.
    """
    _model(loaded, name)
    ledger, error = _read(loaded, name)
    ordered = _ordered(ledger)
    labels = [entry["version"] for entry in ordered]
    latest = [_latest_health(entry) or {} for entry in ordered]
    quant_names = sorted({f["quant"] for entry in ordered for f in entry.get("files") or []})
    quants: dict[str, dict[str, list[Any]]] = {}
    for quant in quant_names:
        series: dict[str, list[Any]] = {"bytes": [], "bits_per_weight": [], "perplexity": []}
        for entry in ordered:
            record = next((f for f in entry.get("files") or [] if f["quant"] == quant), {})
            for key in series:
                series[key].append(record.get(key))
        quants[quant] = series
    health = [{"version": entry["version"], **(_health(report) or {})}
              for entry in ordered for report in entry.get("health") or []]
    return {
        "model": name,
        "error": error,
        "versions": labels,
        "status": [entry.get("status") for entry in ordered],
        "current": ledger.get("current"),
        "latency_s": [h.get("latency_s") for h in latest],
        "tokens_per_s": [h.get("tokens_per_s") for h in latest],
        "health_ok": [h.get("ok") for h in latest],
        "total_bytes": [sum(int(f.get("bytes") or 0) for f in entry.get("files") or []) for entry in ordered],
        "quants": quants,
        "health": health,
    }
