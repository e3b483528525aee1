"""Benchmark the whole chain: the deploy DAG in a real Airflow (and under dag.test) vs a shell script of raw tools.

    .venv/bin/python bench/pipeline/run.py [--size 0p5b|tiny] [--fidelity off|on] [--merge fused|streaming]

By default both sides do the same work: the DAG's fidelity gate (logits and perplexity, which the script
does not do) is off, and the model merges with ``merge.backend: fused``; ``--fidelity on`` measures what
the gate costs on top (results in bench/results/pipeline-<size>-fidelity-<on|off>-<merge>.json unless
the defaults, which write bench/results/pipeline.json).

Same machine, same run, same inputs: a generated bf16 Llama (~0.5B, bench/merge/models.py, with the tiny
model's SentencePiece tokenizer) and an r=16 all-linear LoRA on a loopback OpenSSH "training box".

* script: bench/pipeline/reference.sh (rsync, peft merge_and_unload, convert_hf_to_gguf, the quantizer
  three times, cp, a llama.cpp server probe);
* airflow: api-server + scheduler (LocalExecutor) + dag-processor + triggerer on loopback with SQLite,
  configured as scripts/airflow.sh runs it; after one untimed dry run (Airflow is already up when a
  training job finishes), the run is triggered through the REST API and timed from the trigger to the
  run's success; per-task durations come from the REST API; then the same run again (nothing new: every
  stage reused);
* dag.test: the same DAG in-process, in a fresh artifact store.

Peak RSS is sampled every 0.5 s (SAMPLE_S) over each side's whole process tree: the largest single
process and the largest sum. (Every 0.1 s, sampling Airflow's ~25 processes cost the stages measurable CPU
on 2 cores.) The CPU seconds the Airflow components themselves used during each run are reported too.
Writes bench/results/pipeline.json, docs/images/pipeline.png and prints the tables
for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "merge")]

import yaml  # noqa: E402

from tests.e2e.task_rss import TaskRssSampler  # noqa: E402

QUANTS = ["Q4_K_M", "Q5_K_M", "Q8_0"]
SAMPLE_S = 0.5  # RSS sampling interval
CHAIN = ["plan", "download", "merge", "convert", "quant_types", "quantize", "ggufs", "install", "smoke", "promote",
         "health"]


def prepare(size: str, work: Path) -> tuple[Path, Path]:
    """(base dir with a tokenizer, training box dir holding checkpoint-100): bench/gguf's model and LoRA."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gguf_run", ROOT / "bench" / "gguf" / "run.py")
    assert spec and spec.loader
    bench_gguf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gguf)
    base, adapter = bench_gguf.bench_model(quick=size == "tiny")
    box = work / "box"
    checkpoint = box / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    shutil.copyfile(adapter / "adapter_model.safetensors", checkpoint / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)  # the bench base is assembled elsewhere than the LoRA's
    (checkpoint / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return base, box


def run_script(sshd: Any, box: Path, base: Path, work: Path) -> dict[str, Any]:
    """The reference script, with per-step seconds, total wall and peak RSS."""
    from include.gguf.toolchain import pinned_toolchain

    tool = pinned_toolchain().tool("llama-quantize")  # the quantizer the engine runs, built from the same sources
    quantize_cmd = str(tool) if tool else f"{sys.executable} {ROOT / 'bench/pipeline/quantize.py'}"
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    argv = [str(ROOT / "bench/pipeline/reference.sh"), str(work / "script"), "127.0.0.1", str(sshd.port), sshd.user,
            str(sshd.client_key), str(box / "checkpoint-100"), str(base), str(pinned_toolchain().converter),
            quantize_cmd, str(work / "script-lmstudio")]
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TaskRssSampler([proc.pid], interval_s=SAMPLE_S) as rss:
        out, err = proc.communicate()
    wall = time.monotonic() - started
    if proc.returncode:
        raise SystemExit(f"reference script failed: {err[-3000:]}")
    stages = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if len(line.split()) == 2}
    return {"wall_s": round(wall, 2), "stages": stages, "peak_rss_mb": round(rss.peak_process() / 1e6),
            "peak_rss_sum_mb": round(rss.peak_total() / 1e6), "quantizer": quantize_cmd}


def write_config(path: Path, base: Path, box: Path, work: Path, fidelity: bool, merge: str = "fused") -> Path:
    """The bench model's config: SSH source on the loopback box, three quants, LM Studio dir, no Hub."""
    entry = {"base_model": str(base), "source": {"kind": "ssh", "ssh_conn_id": "bench_box", "remote_dir": str(box)},
             "merge": {"backend": merge}, "quantize": {"types": QUANTS}, "fidelity": {"enabled": fidelity},
             "lmstudio": {"models_dir": str(work / "lmstudio"), "publisher": "bench"},
             "notify": {"slack_conn_id": None}}
    path.write_text(yaml.safe_dump({"settings": {"artifact_root": str(work / "artifacts")},
                                    "models": {"bench": entry}}))
    return path


def task_durations(airflow: Any, run_id: str) -> dict[str, float]:
    """Seconds per task (mapped tasks: each map index, and their span as ``quantize``)."""
    from datetime import datetime

    tis = airflow.api("GET", f"/dags/deploy_bench/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    out: dict[str, float] = {}
    spans: list[tuple[datetime, datetime]] = []
    for ti in tis:
        if not ti.get("start_date") or not ti.get("end_date"):
            continue
        start, end = datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])
        if ti["map_index"] >= 0:
            out[f"quantize[{ti.get('rendered_map_index') or ti['map_index']}]"] = (end - start).total_seconds()
            spans.append((start, end))
        else:
            out[ti["task_id"]] = (end - start).total_seconds()
    if spans:
        out["quantize"] = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()
    return {k: round(v, 2) for k, v in out.items()}


def recomputed(airflow: Any, run_id: str) -> list[str]:
    """The stages of a run that produced their output anew (their XCom record says ``reused: false``).

    A fused merge writes nothing, so only the stages with a stored output are asked: download, convert and
    each quantize type.
    """
    def record(task_id: str, map_index: int = -1) -> dict[str, Any]:
        path = f"/dags/deploy_bench/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        return airflow.api("GET", path, params={"map_index": map_index}).json()["value"]

    fresh = [task for task in ("download",) if not record(task)["reused"]]
    fresh += ["convert"] if not record("convert")["base"]["reused"] else []
    fresh += [f"quantize[{i}]" for i in range(len(QUANTS)) if not record("quantize", i)["reused"]]
    return fresh


def services_cpu(services: Any) -> dict[str, float]:
    """CPU seconds used so far by each Airflow component's own process and the children it has reaped.

    Task processes are not in it (the LocalExecutor's long-lived workers run them), but the dag-processor's
    parsing children are: the figure is what keeping Airflow running costs the cores the stages need.
    """
    import psutil

    used = {}
    for name, proc in services.processes.items():
        times = psutil.Process(proc.pid).cpu_times()
        used[name] = times.user + times.system + times.children_user + times.children_system
    return used


def run_airflow(sshd: Any, config: Path, work: Path, idle_sleep: str | None = None) -> dict[str, Any]:
    """Trigger through REST, time to success; the same again (nothing new).

    The wall time runs from just before the trigger request to the run's ``end_date`` (recorded by the
    scheduler), so the poll for the run's state can be slow (1 s) and cost the api-server little CPU.
    """
    from datetime import datetime

    from tests.e2e.airflow_services import airflow_services, wait_for

    env = {"LORA_DEPLOY_CONFIG": str(config), "AIRFLOW_CONN_BENCH_BOX": sshd.airflow_conn()}
    if idle_sleep is not None:
        env["AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"] = idle_sleep
    services = airflow_services(work / "airflow", env)
    services.start()
    try:
        wait_for(lambda: services.api("GET", "/dags/deploy_bench").ok, timeout_s=180, what="deploy_bench parsed")
        services.api("PATCH", "/dags/deploy_bench", json={"is_paused": False}).raise_for_status()
        results: dict[str, Any] = {}
        # A user's Airflow is already running when a training job finishes: one dry run (the plan task
        # only) warms the executor's first task process up (~4 s once per started Airflow), outside the timing.
        started = time.monotonic()
        run_id = services.trigger("deploy_bench", {"dry_run": True})
        if services.wait_for_run("deploy_bench", run_id, timeout_s=600) != "success":
            raise SystemExit(f"the warm-up dry run failed: {task_durations(services, run_id)}")
        results["warmup_dry_run_s"] = round(time.monotonic() - started, 2)
        for label in ("first", "rerun"):
            cpu_before = services_cpu(services)
            with TaskRssSampler([p.pid for p in services.processes.values()], interval_s=SAMPLE_S) as rss:
                started = time.time()
                response = services.api("POST", "/dags/deploy_bench/dagRuns", json={"logical_date": None, "conf": {}})
                response.raise_for_status()
                run_id = response.json()["dag_run_id"]

                def done(run_id: str = run_id) -> dict[str, Any] | None:
                    run = services.api("GET", f"/dags/deploy_bench/dagRuns/{run_id}").json()
                    return run if run["state"] in ("success", "failed") else None

                run = wait_for(done, timeout_s=3600, what="the bench run", interval_s=1)
                state = run["state"]
                wall = datetime.fromisoformat(run["end_date"]).timestamp() - started
            if state != "success":
                raise SystemExit(f"deploy_bench {label} run {state}: {task_durations(services, run_id)}")
            durations = task_durations(services, run_id)
            critical = sum(durations.get(t, 0.0) for t in CHAIN)
            results[label] = {"wall_s": round(wall, 2), "tasks": durations, "task_work_s": round(critical, 2),
                              "overhead_s": round(wall - critical, 2), "peak_rss_mb": round(rss.peak_process() / 1e6),
                              "peak_rss_sum_mb": round(rss.peak_total() / 1e6),
                              "services_cpu_s": {k: round(v - cpu_before[k], 2)
                                                 for k, v in services_cpu(services).items()}}
            results[label]["recomputed"] = recomputed(services, run_id)
            print(f"airflow {label}: {wall:.1f} s (task work {critical:.1f} s), recomputed "
                  f"{results[label]['recomputed']}", flush=True)
        return results
    finally:
        services.stop()


def run_dag_test(sshd: Any, config: Path, work: Path) -> dict[str, Any]:
    """The same DAG under dag.test() in a fresh interpreter and a fresh artifact store."""
    fresh = config.parent / "models-dagtest.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["settings"]["artifact_root"] = str(work / "artifacts-dagtest")
    raw["models"]["bench"]["lmstudio"]["models_dir"] = str(work / "lmstudio-dagtest")
    fresh.write_text(yaml.safe_dump(raw))
    code = ("import sys; from pathlib import Path; from airflow.utils.db import initdb; initdb(); "
            "from airflow.dag_processing.dagbag import BundleDagBag; d=Path(sys.argv[1]); "
            "bag=BundleDagBag(dag_folder=str(d), bundle_path=d, bundle_name='dags-folder'); "
            "print('STATE', bag.dags['deploy_bench'].test().state)")
    env = {**os.environ, "LORA_DEPLOY_CONFIG": str(fresh), "AIRFLOW_HOME": str(work / "airflow-dagtest"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW_CONN_BENCH_BOX": sshd.airflow_conn(), "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "dags")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    with TaskRssSampler([proc.pid], interval_s=SAMPLE_S) as rss:
        out, _ = proc.communicate()
    wall = time.monotonic() - started
    if "STATE success" not in out:
        raise SystemExit(f"dag.test failed: {out[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss.peak_process() / 1e6)}


def plot(results: dict[str, Any], path: Path) -> None:
    """A PNG of stage times, DAG (real Airflow) vs script, drawn with Pillow."""
    from PIL import Image, ImageDraw

    script = results["script"]["stages"]
    dag = results["airflow"]["first"]["tasks"]
    rows = [("download", script.get("download", 0), dag.get("download", 0)),
            ("merge", script.get("merge", 0), dag.get("merge", 0)),
            ("convert", script.get("convert", 0), dag.get("convert", 0)),
            ("quantize x3", sum(v for k, v in script.items() if k.startswith("quantize")), dag.get("quantize", 0)),
            ("install", script.get("install", 0), dag.get("install", 0)),
            ("health", script.get("health", 0), dag.get("smoke", 0) + dag.get("health", 0)),
            ("orchestration", 0.0, results["airflow"]["first"]["overhead_s"]),
            ("TOTAL", results["script"]["wall_s"], results["airflow"]["first"]["wall_s"])]
    width, row_h, left = 900, 34, 140
    image = Image.new("RGB", (width, 60 + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    top = max(max(s, d) for _, s, d in rows) or 1.0
    scale = (width - left - 90) / top
    draw.text((10, 10), "Stage wall time (s): script (grey) vs deploy DAG in Airflow (orange)", fill="black")
    for i, (name, s, d) in enumerate(rows):
        y = 40 + i * row_h
        draw.text((10, y + 8), name, fill="black")
        draw.rectangle([left, y, left + s * scale, y + 12], fill="#9e9e9e")
        draw.rectangle([left, y + 14, left + d * scale, y + 26], fill="#ef6c00")
        draw.text((left + max(s, d) * scale + 6, y + 8), f"{s:.1f} / {d:.1f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> int:
    """Prepare, run the three sides, write results, plot, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0p5b", choices=["0p5b", "tiny"])
    parser.add_argument("--fidelity", default="off", choices=["off", "on"], help="the DAG's fidelity gate")
    parser.add_argument("--merge", default="fused", choices=["fused", "streaming"], help="the model's merge.backend")
    parser.add_argument("--idle-sleep", help="[scheduler] scheduler_idle_sleep_time (default: the project's 0.5)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    from tests.stand_ins.sshd import start_sshd

    work = Path(tempfile.mkdtemp(prefix="lora-deploy-pipeline-"))
    sshd = start_sshd(work / "sshd")
    try:
        base, box = prepare(args.size, work)
        config = write_config(work / "models.yaml", base, box, work, args.fidelity == "on", args.merge)
        results: dict[str, Any] = {"command": "python bench/pipeline/run.py " + " ".join(sys.argv[1:]),
                                   "size": args.size, "fidelity": args.fidelity, "merge": args.merge,
                                   "scheduler_idle_sleep_s": float(args.idle_sleep or 0.5),
                                   "cpus": os.cpu_count()}
        results["script"] = run_script(sshd, box, base, work)
        print(f"script: {results['script']['wall_s']:.1f} s", flush=True)
        results["airflow"] = run_airflow(sshd, config, work, args.idle_sleep)
        results["dag_test"] = run_dag_test(sshd, config, work)
        print(f"dag.test: {results['dag_test']['wall_s']:.1f} s", flush=True)
    finally:
        sshd.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    first = results["airflow"]["first"]
    results["ratio_vs_script"] = round(first["wall_s"] / results["script"]["wall_s"], 3)
    results["dag_test_ratio_vs_script"] = round(results["dag_test"]["wall_s"] / results["script"]["wall_s"], 3)
    results["rerun_seconds"] = results["airflow"]["rerun"]["wall_s"]
    suffix = "" if (args.size, args.fidelity, args.merge, args.idle_sleep) == ("0p5b", "off", "fused", None) else \
        f"-{args.size}-fidelity-{args.fidelity}-{args.merge}" + (f"-idle-{args.idle_sleep}" if args.idle_sleep else "")
    (ROOT / "bench" / "results" / f"pipeline{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, ROOT / "docs" / "images" / f"pipeline{suffix}.png")
    print(json.dumps({k: results[k] for k in ("ratio_vs_script", "dag_test_ratio_vs_script", "rerun_seconds")}))
    print("\n| stage | script (s) | DAG in Airflow (s) |\n|---|---|---|")
    for name, seconds in results["script"]["stages"].items():
        print(f"| {name} | {seconds:.2f} | {first['tasks'].get(name.split('_')[0], '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
