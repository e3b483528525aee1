"""settings.pools applied to a local metadata database (what scripts/airflow.sh does before starting)."""

from __future__ import annotations

from include.pools import PoolSettings, apply_pools_in_db


def test_pools_are_created_then_resized(airflow_db):
    from airflow.models.pool import Pool

    assert apply_pools_in_db({"ld_test_heavy": PoolSettings(slots=3000)}) == ["pool ld_test_heavy: 3000 slots"]
    assert Pool.get_pool("ld_test_heavy").slots == 3000
    apply_pools_in_db({"ld_test_heavy": PoolSettings(slots=1200, description="half the budget")})
    pool = Pool.get_pool("ld_test_heavy")
    assert (pool.slots, pool.description, pool.include_deferred) == (1200, "half the budget", False)
