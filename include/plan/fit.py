"""Does each stage fit? The plan's memory entries, and the refusal of a run whose stage cannot fit.

The plan task runs on a worker of the default queue. A stage that runs on the same kind of worker (every stage when
``workers.heavy_queue`` is not set; the smoke check and the light tasks always) is checked against this worker's
capacity (MemTotal, its cgroup's limit, ``workers.memory_budget_mb``), and the plan refuses the run before anything
is written when one can never fit. One that fits the capacity but not what is available now gets a warning: the
stage runs later, and checks again when it starts (:func:`include.resources.guard.stage_guard`), as a heavy stage
sent to another queue does: that one is only estimated and logged here.
"""

from __future__ import annotations

from typing import Any

from include.errors import ResourceError
from include.plan.record import DeployPlan
from include.plan.stages import HEAVY_STAGES
from include.resources.guard import StageEstimate, shortfall
from include.resources.memory import MB, WorkerMemory


def memory_entries(estimates: list[StageEstimate], memory: WorkerMemory, heavy_queue: str | None
                   ) -> list[dict[str, Any]]:
    """The plan's ``memory`` entries: each estimate with where it runs and (when that is here) whether it fits."""
    entries = []
    for estimate in estimates:
        elsewhere = heavy_queue is not None and estimate.stage in HEAVY_STAGES
        fits = None if elsewhere else shortfall(estimate, memory, idle=True) is None
        now = None if elsewhere else shortfall(estimate, memory) is None
        entries.append({**estimate.as_record(), "where": f"queue {heavy_queue}: checked there" if elsewhere else "",
                        "fits": fits, "fits_now": now})
    return entries


def memory_warnings(plan: DeployPlan) -> list[str]:
    """A warning for each stage that fits this worker only once other work frees memory."""
    available = (plan.worker_memory or {}).get("available") or 0
    return [f"{e['stage']} (~{e['peak_bytes'] / MB:,.0f} MB) does not fit the {available / MB:,.0f} MB available "
            "now; it waits for memory (its task checks again when it starts, and retries)"
            for e in plan.memory if e.get("fits") and e.get("fits_now") is False]


def require_memory(plan: DeployPlan) -> None:
    """ResourceError (not retryable) naming every stage that does not fit this worker, its numbers and its fix."""
    short = [entry for entry in plan.memory if entry.get("fits") is False]
    if not short:
        return
    worker = plan.worker_memory or {}
    capacity = worker.get("capacity")
    stages = "; ".join(
        f"{e['stage']} needs ~{e['peak_bytes'] / MB:,.0f} MB ("
        + " + ".join(f"{k} {v / MB:,.0f}" for k, v in e.get("parts", {}).items() if v) + " MB"
        + (f"; {e['basis']}" if e.get("basis") else "") + ")" for e in short)
    fixes = list(dict.fromkeys(e.get("fix") or "" for e in short))
    whole = f"at most {capacity / MB:,.0f} MB" if capacity else "less"
    parts = [f"MemTotal {worker['mem_total'] / MB:,.0f} MB" if worker.get("mem_total") else "",
             f"cgroup limit {worker['cgroup_limit'] / MB:,.0f} MB" if worker.get("cgroup_limit") else "",
             f"budget workers.memory_budget_mb={worker['budget'] // 1_000_000}" if worker.get("budget") else ""]
    raise ResourceError(
        f"adapter {plan.version} cannot be deployed on this kind of worker: {stages}, but the worker has {whole} "
        f"({'; '.join(p for p in parts if p)}; available now: {worker.get('text')}); nothing was started",
        fix="; ".join(f for f in fixes if f))
