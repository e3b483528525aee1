"""The seed-style script a user would write, on the same base and adapter: the reference the DAG is measured against.

Steps, each a child process timed and sampled (RssAnon of its process tree every 0.5 s):

1. peft: ``AutoModelForCausalLM.from_pretrained(base, bfloat16)`` + ``PeftModel.from_pretrained`` +
   ``merge_and_unload()`` + ``save_pretrained`` (the merged model on disk);
2. the pinned ``convert_hf_to_gguf.py`` to f16;
3. the pinned ``llama-quantize`` once per type.

No gates, no tokenizer checks, no install or health check: the script does strictly less than the DAG.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

from tests.e2e.task_rss import TaskRssSampler  # noqa: E402

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def _step(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TaskRssSampler([proc.pid], interval_s=0.5, anonymous=True) as rss:
        _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"reference step failed ({argv[:3]}): {err[-3000:]}")
    return {"wall_s": round(time.monotonic() - started, 1), "peak_anon_gb": round(rss.peak_total() / 1e9, 2)}


def run_reference(base: Path, adapter: Path, work: Path, quants: list[str]) -> dict[str, Any]:
    """Run the script's steps in ``work`` (removed afterwards); per step and total wall time and peak anon GB."""
    from include.gguf.toolchain import pinned_toolchain

    toolchain = pinned_toolchain()
    quantize = toolchain.tool("llama-quantize")
    if quantize is None:
        raise SystemExit("no llama-quantize in the pinned toolchain: run python -m include.cli.toolchain ensure")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    steps: dict[str, dict[str, float]] = {}
    started = time.monotonic()
    try:
        merged = work / "merged"
        steps["peft_merge"] = _step([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(merged)])
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (base / name).is_file() and not (merged / name).is_file():
                shutil.copyfile(base / name, merged / name)
        env = {**os.environ, "PYTHONPATH": str(toolchain.gguf_py)}
        f16 = work / "f16.gguf"
        steps["convert"] = _step([sys.executable, str(toolchain.converter), str(merged), "--outfile", str(f16),
                                  "--outtype", "f16"], env)
        shutil.rmtree(merged)  # what a careful script does before quantizing: the disk holds one copy less
        for quant in quants:
            steps[f"quantize[{quant}]"] = _step([str(quantize), str(f16), str(work / f"{quant}.gguf"), quant])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"wall_s": round(time.monotonic() - started, 1), "steps": steps,
            "peak_anon_gb": max(s["peak_anon_gb"] for s in steps.values())}
