"""Benchmark the merge: streaming vs peft merge_and_unload vs ``cp -r`` + ``sync`` of the base, same run.

    .venv/bin/python bench/merge/run.py [--repeats 2] [--sizes 0p5b,1p5b]

Models: generated bf16 Llama bases (~0.5B, ~1.5B) with an r=16 all-linear LoRA (bench/merge/models.py,
cached in ~/.cache/lora-deploy/bench-models). Each case runs as its own process (wall time from start to
exit, peak RSS from wait4), warm page cache, cases interleaved per repeat; the fastest repeat counts.
Writes bench/results/merge.json and prints the markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from models import CACHE, make  # noqa: E402

PY = sys.executable
PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
"""


def run(argv: list[str], out: Path) -> dict[str, float]:
    """Run one case in a fresh process: wall seconds and peak RSS (MB); the output is removed after.

    Peak RSS comes from GNU time (``%M``): Linux keeps ru_maxrss across exec, so a child forked straight
    from this (larger) process would report at least this process's RSS.
    """
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    rss_file = out.parent / "rss.txt"
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *argv], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": round(wall, 2), "rss_mb": round(int(rss_file.read_text().split()[-1]) / 1024, 1)}


def bench_size(size: str, repeats: int, scratch: Path) -> dict[str, dict[str, float]]:
    """Fastest of ``repeats`` runs of each case for one model size."""
    base, adapter = make(size)
    for file in base.iterdir():  # warm the page cache
        with file.open("rb") as handle:
            while handle.read(64 << 20):
                pass
    out = scratch / f"out-{size}"
    cases = {
        "copy": ["sh", "-c", f"cp -r '{base}' '{out}' && sync"],
        "streaming": [PY, "-m", "include.merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)],
        "peft": [PY, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)],
    }
    best: dict[str, dict[str, float]] = {}
    for rep in range(repeats):
        for name, argv in cases.items():
            got = run(argv, out)
            print(f"{size} rep {rep + 1} {name}: {got}", flush=True)
            if name not in best or got["wall_s"] < best[name]["wall_s"]:
                best[name] = got
    best["model"] = {"bytes": sum(p.stat().st_size for p in base.iterdir()),
                     "params": sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2}
    return best


def main() -> None:
    """Run the benchmark, write bench/results/merge.json, print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="0p5b,1p5b")
    args = parser.parse_args()
    scratch = CACHE / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    sizes = args.sizes.split(",")
    results = {size: bench_size(size, args.repeats, scratch) for size in sizes}
    ratios = {
        size: {
            "wall_ratio_vs_peft": round(r["streaming"]["wall_s"] / r["peft"]["wall_s"], 3),
            "rss_ratio_vs_peft": round(r["streaming"]["rss_mb"] / r["peft"]["rss_mb"], 3),
            "wall_ratio_vs_copy": round(r["streaming"]["wall_s"] / r["copy"]["wall_s"], 3),
        }
        for size, r in results.items()
    }
    summary: dict[str, object] = {
        key: max(ratio[key] for ratio in ratios.values())  # the worse size
        for key in ("wall_ratio_vs_peft", "rss_ratio_vs_peft", "wall_ratio_vs_copy")
    }
    if "0p5b" in results and "1p5b" in results:
        summary["rss_growth_0p5b_to_1p5b"] = round(
            results["1p5b"]["streaming"]["rss_mb"] / results["0p5b"]["streaming"]["rss_mb"] - 1, 3)
    record = {
        **summary,
        "goals": {"wall_ratio_vs_peft": "<= 0.4", "rss_ratio_vs_peft": "<= 0.35", "wall_ratio_vs_copy": "<= 1.5",
                  "rss_growth_0p5b_to_1p5b": "< 0.10"},
        "per_size": {size: {**results[size], **ratios[size]} for size in sizes},
        "command": f".venv/bin/python bench/merge/run.py --repeats {args.repeats} --sizes {args.sizes}",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = ROOT / "bench" / "results" / "merge.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print("\n| model | case | wall s | peak RSS MB |\n|---|---|---|---|")
    for size in sizes:
        for case in ("copy", "streaming", "peft"):
            r = results[size][case]
            rss = "-" if case == "copy" else r["rss_mb"]
            print(f"| {size} | {case} | {r['wall_s']} | {rss} |")


if __name__ == "__main__":
    main()
