"""Airflow pools declared in the config: how much heavy work (merge, convert, quantize) runs at once.

``settings.pools`` names the installation's pools and their size; a model's ``workers.heavy_pool`` puts its
heavy tasks in one, each taking ``workers.heavy_pool_slots`` slots. Sized in megabytes, a pool is a memory
budget: ``slots`` = the RAM the heavy stages of every model may hold together, ``heavy_pool_slots`` = the
peak of one heavy task of that model (docs/operations.md has measured peaks). The scheduler then never
starts a heavy task whose slots do not fit, so three models deploying at once stay under the budget.

Pools live in Airflow's database, not in DAG files, so they are applied from outside the DAGs:
``lora-deploy-trigger pools`` (REST, any installation), or ``python -m include.cli.pools`` listing them for
``airflow pools set`` (a local Airflow before it starts, as ``scripts/airflow.sh`` does). Nothing here
imports Airflow.
"""

from __future__ import annotations

from pydantic import Field

from include.config.sections import StrictModel
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
