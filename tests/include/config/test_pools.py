"""settings.pools for a local Airflow: listed by ``python -m include.cli.pools`` and fed to ``airflow pools set``,
exactly as scripts/airflow.sh does before starting."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests.conftest import ROOT

LOOP = '''"$PY" -m include.cli.pools | while IFS=$'\\t' read -r name slots description; do
  "$AIRFLOW" pools set "$name" "$slots" "$description" >/dev/null && echo "pool $name: $slots slots"
done'''


def test_config_pools_are_listed_then_set_in_the_metadata_db(tmp_path, airflow_db):
    from airflow.models.pool import Pool

    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({
        "settings": {"pools": {"ld_test_heavy": {"slots": 3000, "description": "heavy stages, MB"},
                               "ld_test_gpu": {"slots": 1}}},
        "models": {"m": {"base_model": "/m", "source": {"kind": "local", "path": "/box"}}}}))
    env = {**os.environ, "LORA_DEPLOY_CONFIG": str(config), "PYTHONPATH": str(ROOT), "PY": sys.executable,
           "AIRFLOW": str(ROOT / ".venv" / "bin" / "airflow")}
    listed = subprocess.run([sys.executable, "-m", "include.cli.pools"], env=env, capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout
    assert listed.splitlines() == ["ld_test_gpu\t1\tlora-deploy heavy stages (merge, convert, quantize)",
                                   "ld_test_heavy\t3000\theavy stages, MB"]
    done = subprocess.run(["bash", "-c", LOOP], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["pool ld_test_gpu: 1 slots", "pool ld_test_heavy: 3000 slots"]
    pool = Pool.get_pool("ld_test_heavy")
    assert (pool.slots, pool.description, pool.include_deferred) == (3000, "heavy stages, MB", False)
