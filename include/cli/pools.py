"""``python -m include.cli.pools``: the config's Airflow pools as lines for ``airflow pools set``."""

from __future__ import annotations

from include.config.loader import load_config


def main() -> int:
    """``python -m include.cli.pools``: the config's pools, one ``name<TAB>slots<TAB>description`` line each.

    ``scripts/airflow.sh`` feeds them to ``airflow pools set`` before starting a local Airflow.
    """
    for name, pool in sorted(load_config().settings.pools.items()):
        print(f"{name}\t{pool.slots}\t{pool.description}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
