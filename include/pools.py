"""Airflow pools declared in the config: how much heavy work (merge, convert, quantize) runs at once.

``settings.pools`` names the installation's pools and their size; a model's ``workers.heavy_pool`` puts its
heavy tasks in one, each taking ``workers.heavy_pool_slots`` slots. Sized in megabytes, a pool is a memory
budget: ``slots`` = the RAM the heavy stages of every model may hold together, ``heavy_pool_slots`` = the
peak of one heavy task of that model (docs/operations.md has measured peaks). The scheduler then never
starts a heavy task whose slots do not fit, so three models deploying at once stay under the budget.

Pools live in Airflow's database, not in DAG files, so they are applied from outside the DAGs:
``lora-deploy-trigger pools`` (REST, any installation), or ``python -m include.pools`` listing them for
``airflow pools set`` (a local Airflow before it starts, as ``scripts/airflow.sh`` does). Nothing here
imports Airflow.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import quote

from pydantic import Field

from include.config_sections import StrictModel
from include.errors import ConfigError

DEFAULT_POOL_DESCRIPTION = "lora-deploy heavy stages (merge, convert, quantize)"


class PoolSettings(StrictModel):
    """One Airflow pool: its size and what it is for."""

    slots: int = Field(ge=1, description="pool size; for a memory pool, the heavy stages' RAM budget in MB")
    description: str = DEFAULT_POOL_DESCRIPTION


def check_heavy_pool(model: str, pool: str | None, slots: int, pools: dict[str, PoolSettings]) -> None:
    """ConfigError when a model's heavy task would need more slots than its (declared) pool has.

    Airflow never schedules such a task: it would wait in ``scheduled`` forever.
    """
    if pool is None or pool not in pools or slots <= pools[pool].slots:
        return
    raise ConfigError(
        f"field 'models.{model}.workers.heavy_pool_slots' is {slots} but pool {pool!r} has only "
        f"{pools[pool].slots} slots (settings.pools.{pool}.slots): its heavy tasks would never be scheduled",
        model=model,
        fix=f"lower models.{model}.workers.heavy_pool_slots to at most {pools[pool].slots} or raise "
            f"settings.pools.{pool}.slots",
    )


class PoolClient(Protocol):
    """What :func:`apply_pools_rest` needs of a REST client (``include.trigger.AirflowClient`` is one)."""

    def pool(self, name: str) -> dict[str, Any] | None:
        """The pool's record, or None when it does not exist."""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request to ``/api/v2<path>``."""


def apply_pools_rest(client: PoolClient, pools: dict[str, PoolSettings]) -> list[str]:
    """Create or resize each pool through the REST API; returns one line per pool saying what changed."""
    lines = []
    for name, pool in sorted(pools.items()):
        current = client.pool(name)
        body = {"slots": pool.slots, "description": pool.description}
        if current is None:
            client.call("POST", "/pools", {"name": name, "include_deferred": False, **body})
            lines.append(f"pool {name}: created with {pool.slots} slots")
        elif current.get("slots") != pool.slots or current.get("description") != pool.description:
            # Without an update_mask the api-server validates a whole pool: name and include_deferred too.
            client.call("PATCH", f"/pools/{quote(name, safe='')}", {"pool": name, "include_deferred": False, **body})
            lines.append(f"pool {name}: {current.get('slots')} -> {pool.slots} slots")
        else:
            lines.append(f"pool {name}: {pool.slots} slots (unchanged)")
    return lines


def main() -> int:
    """``python -m include.pools``: the config's pools, one ``name<TAB>slots<TAB>description`` line each.

    ``scripts/airflow.sh`` feeds them to ``airflow pools set`` before starting a local Airflow.
    """
    from include.config import load_config

    for name, pool in sorted(load_config().settings.pools.items()):
        print(f"{name}\t{pool.slots}\t{pool.description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
