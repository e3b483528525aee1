"""Benchmark DAG parsing: the deploy DAG file with 1, 50 and 500 models, and its import overhead.

    .venv/bin/python bench/parse/run.py [--models 1,50,500] [--repeats 3]

Each measurement is a fresh interpreter (as the dag-processor's parsing child is): it imports
``airflow.sdk`` first (not counted: every DAG file pays it), then times

* ``import_overhead_s``: importing what the DAG file imports beyond ``airflow.sdk`` (the operators,
  the config schema, pydantic), i.e. the file's fixed cost;
* ``module_s``: executing the DAG file (imports + config validation + building every DAG);
* ``dagbag_s``: a ``BundleDagBag`` parse of the folder, which adds Airflow's own DAG validation and
  bagging, the figure the dag-processor sees.

Every model has the full task list (deploy DAG and rollback DAG). The median of the repeats counts.
Writes bench/results/parse.json and prints the markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

PROBE = r"""
import json, sys, time, runpy
import airflow.sdk  # every DAG file pays this; not counted
from pathlib import Path
mode, dags = sys.argv[1], Path(sys.argv[2])
started = time.perf_counter()
if mode == "imports":
    import include.config.loader, include.gguf.quant_types  # noqa
    import operators.operators.download, operators.operators.gguf, operators.operators.gguf_asset  # noqa
    import operators.operators.hf_space, operators.operators.lmstudio, operators.operators.merge  # noqa
    import operators.operators.plan, operators.operators.promote, operators.notifiers.slack  # noqa
    import operators.sensors.health, operators.sensors.hf_space  # noqa
    count = 0
elif mode == "module":
    count = sum(1 for v in runpy.run_path(str(dags / "deploy_models.py")).values()
                if type(v).__name__ == "DAG")
else:
    from airflow.dag_processing.dagbag import BundleDagBag
    bag = BundleDagBag(dag_folder=str(dags), bundle_path=dags, bundle_name="dags-folder")
    assert not bag.import_errors, bag.import_errors
    count = len(bag.dags)
print(json.dumps({"seconds": time.perf_counter() - started, "dags": count}))
"""


def write_config(path: Path, models: int) -> None:
    """A config with ``models`` entries shaped like a real deployment (SSH source, HF target, schedule)."""
    entries = {
        f"model-{i:03d}": {
            "base_model": "/models/base", "schedule": "0 3 * * *",
            "source": {"kind": "ssh", "ssh_conn_id": "box", "remote_dir": f"/workspace/out/m{i}"},
            "quantize": {"types": ["Q4_K_M", "Q5_K_M", "Q8_0"]},
            "lmstudio": {"models_dir": "/lmstudio/models", "endpoint": "http://127.0.0.1:1234"},
            "hf": {"repo_id": f"me/model-{i:03d}-GGUF", "space_id": f"me/model-{i:03d}-chat"},
        } for i in range(models)
    }
    path.write_text(yaml.safe_dump({"settings": {"artifact_root": "/tmp/lora-deploy-bench-artifacts"},
                                    "models": entries}))


def probe(mode: str, config: Path) -> dict[str, float]:
    """One fresh interpreter measuring ``mode`` against ``config``."""
    env = {**os.environ, "LORA_DEPLOY_CONFIG": str(config), "PYTHONPATH": str(ROOT),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR"}
    out = subprocess.run([PY, "-c", PROBE, mode, str(ROOT / "dags")], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    """Run every case, write the results, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1,50,500")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.models.split(",")]
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                  "command": "python bench/parse/run.py " + " ".join(sys.argv[1:]),
                                  "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "models.yaml"
        write_config(config, 1)
        overhead = statistics.median(probe("imports", config)["seconds"] for _ in range(args.repeats))
        results["import_overhead_s"] = round(overhead, 4)
        for models in counts:
            write_config(config, models)
            module = [probe("module", config) for _ in range(args.repeats)]
            bag = [probe("dagbag", config) for _ in range(args.repeats)]
            case = {"module_s": round(statistics.median(m["seconds"] for m in module), 4),
                    "dagbag_s": round(statistics.median(b["seconds"] for b in bag), 4),
                    "dags": bag[0]["dags"]}
            results["cases"][str(models)] = case  # type: ignore[index]
            print(f"{models:4d} models: module {case['module_s']:.3f} s, dagbag {case['dagbag_s']:.3f} s "
                  f"({case['dags']} DAGs)", flush=True)
    cases = results["cases"]
    if "500" in cases:  # type: ignore[operator]
        results["seconds_500_models"] = cases["500"]["dagbag_s"]  # type: ignore[index]
    out = ROOT / "bench" / "results" / "parse.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nimport overhead beyond airflow.sdk: {overhead * 1000:.0f} ms\n")
    print("| models | DAGs | module exec (s) | DagBag parse (s) |\n|---|---|---|---|")
    for models, case in cases.items():  # type: ignore[union-attr]
        print(f"| {models} | {case['dags']} | {case['module_s']:.3f} | {case['dagbag_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
