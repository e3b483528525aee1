"""Real-shaped models through the real deploy DAG: per-stage time, peak anonymous memory, disk, store after N runs.

    .venv/bin/python bench/scale/run.py --shape qwen2.5-7b [--runs 3] [--keep-versions 1] [--reference]

One shape per invocation (a 7B model is ~15 GB per copy: run the shapes one after another). It generates a
random bf16 base with the shape's dimensions as a LlamaForCausalLM (bench/scale/make_model.py) and one r=16
all-linear LoRA per run (bench/scale/make_adapter.py) in a local "training box". It writes a config that is the
project's defaults except for paths (every gate on; quant types Q4_K_M, Q5_K_M, Q8_0; fused merge; retention
on), starts a real Airflow (api-server, scheduler with LocalExecutor, dag-processor, triggerer; SQLite) and
deploys the adapters one after another, as a nightly schedule would. For each run it records:

* each task's wall time (REST) and peak anonymous memory: RssAnon of the task's process tree (the
  ``airflow worker -- <ti id>`` process and its children: converter, llama-quantize, llama.cpp server), sampled
  every 0.5 s; file-backed pages (the mmap'd safetensors and GGUFs) are the kernel's cache and are not counted;
* the disk high-water mark: the filesystem's used bytes, sampled every 0.5 s, minus the value before the run
  (the base model and the previous runs' kept files are already there);
* the bytes left in the artifact store, in the LM Studio models tree, and in both (hard links once) after the run;
* the plan task's record (its estimates, to compare with the measurements).

``--reference`` also runs the seed-style script on the same base and first adapter (bench/scale/reference.py:
peft merge_and_unload, convert_hf_to_gguf, llama-quantize x3) for the time and memory ratios. The live LM Studio
check is skipped (no LM Studio here); the smoke check serves each version through llama.cpp as usual.
Results merge into bench/results/scale.json under the shape's name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "scale")]

import yaml  # noqa: E402
from make_adapter import make_adapter  # noqa: E402
from make_model import SHAPES, make_model  # noqa: E402

from tests.e2e.task_rss import TaskRssSampler  # noqa: E402

DAG_ID = "deploy_scale"
QUANTS = ["Q4_K_M", "Q5_K_M", "Q8_0"]
SAMPLE_S = 0.5
RESULTS = ROOT / "bench" / "results" / "scale.json"


def gb(value: float) -> float:
    """Bytes as GB (10^9), two decimals."""
    return round(value / 1e9, 2)


def tree_bytes(*paths: Path) -> int:
    """Bytes of the regular files under ``paths`` (a file hard-linked in several places counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in paths:
        for root, _, files in os.walk(path):
            for name in files:
                stat = os.lstat(os.path.join(root, name))
                if (stat.st_dev, stat.st_ino) not in seen:
                    seen.add((stat.st_dev, stat.st_ino))
                    total += stat.st_size
    return total


class DiskSampler:
    """The largest ``used`` bytes of a filesystem while active (a thread polling statvfs)."""

    def __init__(self, path: Path, interval_s: float = SAMPLE_S) -> None:
        self.path, self.interval_s = path, interval_s
        self.start = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="disk-sampler")

    def _used(self) -> int:
        stat = os.statvfs(self.path)
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())


def prepare(shape: str, work: Path, runs: int) -> tuple[Path, Path, list[str]]:
    """The base model, the box and its checkpoint names (dated one day apart, oldest first)."""
    base = work / "base"
    if not (base / "config.json").is_file():
        started = time.monotonic()
        make_model(base, shape, arch="llama")  # Qwen2.5's dimensions; see make_model's docstring
        print(f"generated {shape} in {time.monotonic() - started:.0f} s: {gb(tree_bytes(base))} GB", flush=True)
    box = work / "box"
    versions = []
    for i in range(runs):
        name = f"checkpoint-{(i + 1) * 100}"
        checkpoint = box / name
        if not (checkpoint / "adapter_config.json").is_file():
            make_adapter(base, checkpoint, seed=i + 1)
        stamp = 1_790_000_000 + i * 86_400
        os.utime(checkpoint, (stamp, stamp))
        versions.append(name)
    return base, box, versions


def write_config(path: Path, base: Path, box: Path, work: Path, keep_versions: int, on_fallback: str) -> Path:
    """The defaults of config/models.yaml's schema, except for where things are (and no Slack, no live endpoint)."""
    entry = {"base_model": str(base), "source": {"kind": "local", "path": str(box)},
             "quantize": {"types": QUANTS, "on_fallback": on_fallback},
             "lmstudio": {"models_dir": str(work / "lmstudio"), "publisher": "bench", "keep_versions": keep_versions},
             "notify": {"slack_conn_id": None}}
    path.write_text(yaml.safe_dump({"settings": {"artifact_root": str(work / "artifacts")},
                                    "models": {"scale": entry}}))
    return path


def task_figures(services: Any, run_id: str, rss: TaskRssSampler) -> dict[str, dict[str, float]]:
    """Per task (mapped quantize tasks by type): wall seconds and peak anonymous GB."""
    from datetime import datetime

    tis = services.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    peaks = rss.peak_per_task()
    out: dict[str, dict[str, float]] = {}
    for ti in tis:
        name = ti["task_id"] if ti["map_index"] < 0 else f"quantize[{ti.get('rendered_map_index') or ti['map_index']}]"
        figures: dict[str, float] = {"state": ti["state"]}
        if ti.get("start_date") and ti.get("end_date"):
            figures["wall_s"] = round((datetime.fromisoformat(ti["end_date"])
                                       - datetime.fromisoformat(ti["start_date"])).total_seconds(), 1)
        figures["peak_anon_gb"] = gb(peaks.get(ti["id"], 0))
        out[name] = figures
    return out


def xcom(services: Any, run_id: str, task_id: str) -> Any:
    """A task's return value."""
    path = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
    response = services.api("GET", path)
    return response.json().get("value") if response.ok else None


def deploy_all(work: Path, config: Path, versions: list[str]) -> list[dict[str, Any]]:
    """Start Airflow, deploy each version in turn; the figures of each run."""
    from tests.e2e.airflow_services import airflow_services, wait_for

    services = airflow_services(work / "airflow", {"LORA_DEPLOY_CONFIG": str(config)})
    services.start(timeout_s=180)
    runs = []
    try:
        wait_for(lambda: services.api("GET", f"/dags/{DAG_ID}").ok, timeout_s=180, what=f"{DAG_ID} parsed")
        services.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
        for version in versions:
            roots = [p.pid for p in services.processes.values()]
            with DiskSampler(work) as disk, TaskRssSampler(roots, interval_s=SAMPLE_S, anonymous=True) as rss:
                started = time.monotonic()
                response = services.api("POST", f"/dags/{DAG_ID}/dagRuns",
                                        json={"logical_date": None, "conf": {"adapter_version": version}})
                response.raise_for_status()
                run_id = response.json()["dag_run_id"]
                state = services.wait_for_run(DAG_ID, run_id, timeout_s=4 * 3600)
                wall = time.monotonic() - started
            tasks = task_figures(services, run_id, rss)
            run = {"version": version, "state": state, "wall_s": round(wall, 1), "tasks": tasks,
                   "peak_anon_gb": max((t["peak_anon_gb"] for t in tasks.values()), default=0.0),
                   "disk_high_water_gb": gb(disk.peak - disk.start),
                   "store_gb": gb(tree_bytes(work / "artifacts")), "lmstudio_gb": gb(tree_bytes(work / "lmstudio")),
                   "store_and_lmstudio_gb": gb(tree_bytes(work / "artifacts", work / "lmstudio")),
                   "plan": xcom(services, run_id, "plan"), "retention": xcom(services, run_id, "retention")}
            runs.append(run)
            print(f"{version}: {state} in {wall:.0f} s; peak anon {run['peak_anon_gb']} GB; disk high-water "
                  f"{run['disk_high_water_gb']} GB; store {run['store_gb']} GB; store + LM Studio "
                  f"{run['store_and_lmstudio_gb']} GB", flush=True)
            print("  " + ", ".join(f"{k} {v.get('wall_s', '-')} s/{v['peak_anon_gb']} GB" for k, v in tasks.items()),
                  flush=True)
            if state != "success":
                failed = [name for name, t in tasks.items() if t["state"] in ("failed", "upstream_failed")]
                for log in sorted((work / "airflow" / "logs").rglob("*.log")):
                    if f"run_id={run_id}" in str(log) and any(f"task_id={t.split('[')[0]}" in str(log) for t in failed):
                        print(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]),
                              file=sys.stderr)
                break
    finally:
        services.stop()
    return runs


def summarize(shape: str, runs: list[dict[str, Any]], reference: dict[str, Any] | None) -> dict[str, Any]:
    """The shape's entry of bench/results/scale.json."""
    hidden, inter, _, heads, kv_heads, vocab, _ = SHAPES[shape]
    kv = hidden // heads * kv_heads
    layer_params = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    entry: dict[str, Any] = {
        "largest_decoder_layer_fp32_gb": gb(layer_params * 4), "embedding_fp32_gb": gb(vocab * hidden * 4),
        "goal_gb": gb(2e9 + 1.5 * max(layer_params, vocab * hidden) * 4), "runs": runs,
    }
    first = runs[0]
    entry["wall_s"] = {"total": first["wall_s"], **{k: v.get("wall_s") for k, v in first["tasks"].items()}}
    entry["peak_anon_rss_gb"] = {k: max(r["tasks"].get(k, {}).get("peak_anon_gb", 0) for r in runs)
                                 for k in first["tasks"]}
    entry["disk_high_water_gb"] = max(r["disk_high_water_gb"] for r in runs)
    entry["store_gb_after_runs"] = [r["store_gb"] for r in runs]
    entry["store_and_lmstudio_gb_after_runs"] = [r.get("store_and_lmstudio_gb") for r in runs]
    if reference:
        entry["reference"] = reference
        entry["ratio_vs_reference"] = round(first["wall_s"] / reference["wall_s"], 3)
    return entry


def overview(shapes: dict[str, Any]) -> dict[str, Any]:
    """The cross-shape view at the top of scale.json: one key per figure, one entry per shape (smallest first)."""
    order = sorted(shapes, key=lambda name: (shapes[name]["runs"][0].get("plan") or {}).get("parameters", 0))
    params = {name: round(((shapes[name]["runs"][0].get("plan") or {}).get("parameters", 0)) / 1e9, 2)
              for name in order}
    return {
        "params_b": params,
        "goal_gb": {name: shapes[name]["goal_gb"] for name in order},
        "peak_anon_rss_gb": {name: shapes[name]["peak_anon_rss_gb"] for name in order},
        "disk_high_water_gb": {name: shapes[name]["disk_high_water_gb"] for name in order},
        "store_gb_after_1_run": {name: shapes[name]["store_gb_after_runs"][0] for name in order},
        "store_and_lmstudio_gb_after_runs": {name: shapes[name].get("store_and_lmstudio_gb_after_runs")
                                             for name in order},
        "store_gb_after_3_runs": {name: (shapes[name]["store_gb_after_runs"][2]
                                         if len(shapes[name]["store_gb_after_runs"]) >= 3 else None)
                                  for name in order},
        "wall_s": {name: shapes[name]["wall_s"] for name in order},
    }


def main() -> int:
    """Prepare, deploy, record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep-versions", type=int, default=1)
    parser.add_argument("--on-fallback", default="fail", choices=["fail", "warn"],
                        help="quantize.on_fallback (warn for shapes whose rows are not multiples of 256: 0.5B)")
    parser.add_argument("--reference", action="store_true", help="also run the seed-style script on this shape")
    parser.add_argument("--work", type=Path, default=None, help="work dir (default /tmp/lora-deploy-scale-<shape>)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (the generated model) afterwards")
    args = parser.parse_args()
    work = (args.work or Path(f"/tmp/lora-deploy-scale-{args.shape}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, box, versions = prepare(args.shape, work, args.runs)
        reference = None
        if args.reference:
            from reference import run_reference

            reference = run_reference(base, box / versions[0], work / "reference", QUANTS)
            print(f"reference script: {reference['wall_s']} s, peak anon {reference['peak_anon_gb']} GB", flush=True)
        config = write_config(work / "models.yaml", base, box, work, args.keep_versions, args.on_fallback)
        runs = deploy_all(work, config, versions)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.setdefault("shapes", {})[args.shape] = summarize(args.shape, runs, reference)
    results.setdefault("commands", {})[args.shape] = "python bench/scale/run.py " + " ".join(sys.argv[1:])
    results.update(overview(results["shapes"]))
    results["cpus"], results["mem_gb"] = os.cpu_count(), gb(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results["shapes"][args.shape].items() if k != "runs"}, indent=2))
    return 0 if all(r["state"] == "success" for r in runs) and len(runs) == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
