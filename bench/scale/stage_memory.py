"""Peak anonymous memory of each stage's engine call, measured, next to the plan's estimate for the same model.

    .venv/bin/python bench/scale/stage_memory.py --model BASE_DIR --adapter ADAPTER_DIR --work DIR --label NAME
                                                  [--cases merge-fused,convert,...] [--out bench/scale/stages.json]
    .venv/bin/python bench/scale/stage_memory.py --predict qwen2.5-7b     # the estimates alone, nothing generated

Each case runs in a fresh child process that first imports what an Airflow task process holds (the task runner
and the operator modules), reports its RssAnon, then makes the stage's engine call the way the operator does.
This process samples ``RssAnon`` of the child and all its descendants (the converter, llama-quantize,
llama-imatrix, the llama.cpp server) every 10 ms and keeps the largest sum (include.resources.sampler).
Cases that need a GGUF use the ones earlier cases wrote into ``--work`` (run ``convert`` before ``fidelity``,
``quantize-*``, ``smoke``). Each result carries the estimate of include.plan.memory for the same inputs, so the
constants there can be checked (and refitted) against these figures; results merge into ``--out`` under
``--label`` (``--estimate-only`` recomputes the estimates of figures already there). ``--predict`` reads the headers
of a sparse checkpoint of a bench shape (make_model.py's tensor shapes, holes for data) and prints a run's estimates.
Note: a sample taken while a process forks, before it execs, counts the parent's pages twice (RssAnon of both);
the 10 ms sampling sometimes catches it, as a one-off spike of the parent's size.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "scale")]

from include.resources.sampler import PeakSampler  # noqa: E402

CASES = ("light", "merge-fused", "merge-streaming", "merge-peft", "convert", "convert-merged", "fidelity",
         "ppl-f16", "imatrix", "quantize-Q8_0", "quantize-Q4_K_M", "quantize-Q5_K_M", "ppl-Q4_K_M", "smoke")

_CHILD = r"""
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import airflow.sdk.execution_time.task_runner  # what a task process holds before the stage
import operators.operators.gguf, operators.operators.merge, operators.operators.plan, operators.sensors.health
case, model, adapter, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
f16 = work / "m-F16.gguf"
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) * 1024
before, started, result = anon(), time.monotonic(), {}
from include.gguf.toolchain import pinned_toolchain
from include.config.sections import FidelitySettings
fidelity = FidelitySettings()
if case == "light":
    pass
elif case == "merge-fused":
    from include.merge.fused import check_fusable
    edits, _ = check_fusable(model, adapter)
    result = {"edits": len(edits.edits)}
elif case.startswith("merge-"):
    import shutil
    from include.merge.backends import merge_model
    out = work / f"merged-{case}"
    shutil.rmtree(out, ignore_errors=True)
    result = {k: v for k, v in merge_model(model, adapter, out, backend=case.split("-")[1]).items()
              if k in ("bytes", "backend")}
    if case == "merge-peft":
        shutil.rmtree(out, ignore_errors=True)
elif case in ("convert", "convert-merged"):
    from include.gguf import tokenizer as tk
    from include.gguf.convert import convert_to_gguf
    source = work / "merged-merge-streaming" if case == "convert-merged" else model
    out = f16 if case == "convert" else work / "merged-F16.gguf"
    with ThreadPoolExecutor(max_workers=1) as pool:  # the operator's token reference, beside the converter
        reference = pool.submit(tk.hf_tokenization, source)
        summary = convert_to_gguf(source, out, toolchain=pinned_toolchain(),
                                  fused_adapter=adapter if case == "convert" else None)
        try:  # the generated models pad their vocabulary: token ids may differ, the memory does not
            tk.compare_tokenization(summary.path, source, reference=reference.result())
        except Exception as err:
            print('token comparison:', str(err)[:200])
    result = {"bytes": summary.bytes}
elif case == "fidelity":
    from include.gguf.fidelity import compare_logits
    r = compare_logits(model, f16, prompts=fidelity.prompts, max_abs_diff=1e9, max_kl=1e9, mode="warn",
                       fused_adapter=adapter)
    result = {"tokens": r["tokens"]}
elif case.startswith("ppl-"):
    from include.gguf.fidelity import evaluation_text, perplexity
    quant = case.split("-", 1)[1]
    path = f16 if quant == "f16" else work / f"m-{quant}.gguf"
    result = {"ppl": perplexity(path, evaluation_text(fidelity).text, n_ctx=fidelity.n_ctx)}
elif case == "imatrix":
    from include.gguf.imatrix import compute_imatrix
    from include.gguf.fidelity import default_eval_text
    compute_imatrix(pinned_toolchain(), f16, default_eval_text(), work / "imatrix.gguf")
elif case.startswith("quantize-"):
    from include.gguf.quantize import quantize_gguf
    quant = case.split("-", 1)[1]
    summary = quantize_gguf(f16, work / f"m-{quant}.gguf", quant, toolchain=pinned_toolchain())
    result = {"bytes": summary.bytes, "bits_per_weight": summary.bits_per_weight}
elif case == "smoke":
    from include.health.endpoint import check_chat
    from include.health.smoke import serve_gguf
    with serve_gguf(work / "m-Q4_K_M.gguf", model_id="m") as url:
        time.sleep(1.0)
        r = check_chat(url, model_id="m", system_prompt="You are brief.", prompt="Say hello.", max_tokens=16)
    result = {"tokens_per_s": r.get("tokens_per_s")}
print("RESULT " + json.dumps({"before": before, "wall_s": round(time.monotonic() - started, 2), **result}),
      flush=True)
"""


def run_case(case: str, model: Path, adapter: Path, work: Path) -> dict[str, Any]:
    """Run one case in a child; its tree's peak RssAnon (bytes) and what the child reported."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, case, str(model), str(adapter), str(work)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakSampler(proc.pid, interval_s=0.01) as sampler:
        output = proc.communicate()[0]
    line = next((x for x in output.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"case {case} failed (exit {proc.returncode}):\n{output[-3000:]}")
    return {"peak": sampler.peak, **json.loads(line.removeprefix("RESULT "))}


def estimate(case: str, model: Path, adapter: Path, work: Path) -> dict[str, Any] | None:
    """The plan's estimate for the case (include.plan.memory), or None when the case has none."""
    from include.config.sections import FidelitySettings, ImatrixSettings
    from include.plan import memory
    from include.plan.shapes import gguf_shape, model_shape

    fidelity = FidelitySettings()
    f16 = work / "m-F16.gguf"
    if case == "light":
        found = memory.light_estimate("light")
    elif case.startswith("merge-"):
        found = memory.merge_estimate(model_shape(model), adapter_bytes=memory.adapter_bytes(adapter),
                                      backend=case.split("-")[1])
    elif case in ("convert", "convert-merged"):
        shape = model_shape(model)
        found = memory.convert_phases(shape, fused=case == "convert", fidelity=None,
                                      imatrix=ImatrixSettings())["converter"]
    elif case == "fidelity":
        found = memory.convert_phases(model_shape(model), fused=True, fidelity=fidelity,
                                      imatrix=ImatrixSettings())["logits"]
    elif case.startswith("ppl-"):
        quant = case.split("-", 1)[1]
        found = memory.perplexity_estimate(gguf_shape(f16 if quant == "f16" else work / f"m-{quant}.gguf"),
                                           fidelity.n_ctx)
    elif case == "imatrix":
        found = memory.imatrix_estimate(gguf_shape(f16), ImatrixSettings().ctx_size)
    elif case.startswith("quantize-"):
        found = memory.quantize_tool_estimate(gguf_shape(f16), case.split("-", 1)[1])
    elif case == "smoke":
        found = memory.smoke_estimate(gguf_shape(work / "m-Q4_K_M.gguf"))
    else:
        return None
    return {"bytes": found.peak_bytes, "parts": found.parts}


def predict(shape_name: str) -> None:
    """Print the plan's estimates for a bench shape without generating it: a sparse checkpoint (real headers, holes
    for data) in a temp dir is all the headers-only estimates read."""
    import struct
    import tempfile

    from make_model import SHAPES, tensor_shapes

    from include.config.sections import FidelitySettings, MergeSettings, QuantizeSettings
    from include.plan import estimate_outputs, memory
    from include.plan.memory import goal_bytes
    from include.plan.shapes import model_shape
    from include.plan.stages import run_estimates

    with tempfile.TemporaryDirectory() as tmp:
        header, offset = {}, 0
        for name, dims in tensor_shapes(shape_name).items():
            size = 2 * int(math.prod(dims))
            header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        path = Path(tmp, "model.safetensors")
        with path.open("wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            handle.truncate(8 + len(raw) + offset)
        hidden, _, layers, heads, kv_heads, vocab, tied = SHAPES[shape_name]
        Path(tmp, "config.json").write_text(json.dumps({
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": tied}))
        shape = model_shape(Path(tmp))
    types = ["Q4_K_M", "Q5_K_M", "Q8_0"]
    for estimate in run_estimates(shape, merge=MergeSettings(), quantize=QuantizeSettings(types=types),
                                  fidelity=FidelitySettings(), quant_types=types):
        print(f"{estimate.stage:9s} {estimate.peak_bytes / 1e6:9,.0f} MB  {estimate.terms()}")
        if estimate.stage == "convert":  # its phases run one after another; the task's peak is the largest
            for phase, found in memory.convert_phases(shape, fused=True, fidelity=FidelitySettings(),
                                                      imatrix=None).items():
                print(f"  {phase:12s} {found.peak_bytes / 1e6:6,.0f} MB  {found.terms()}")
    print(f"goal      {goal_bytes(shape) / 1e6:9,.0f} MB  (largest layer: {shape.largest_layer[0]}, "
          f"{shape.largest_layer[1] / 1e6:,.0f} MB in float32)")
    for output in estimate_outputs(shape.parameters, shape.stored_bytes, "fused", "f16", types, shape=shape)[1:]:
        print(f"disk      {output['name']:6s} {output['bytes'] / 1e6:9,.0f} MB")


def main() -> None:
    """Command line: measure the cases on one model, print a table, merge the figures into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predict", metavar="SHAPE", help="print the estimates for a bench shape and exit")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--label")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale" / "stages.json")
    parser.add_argument("--no-estimate", action="store_true", help="measure only")
    parser.add_argument("--estimate-only", action="store_true", help="recompute the estimates of measured cases")
    args = parser.parse_args()
    if args.predict:
        predict(args.predict)
        return
    if not (args.model and args.adapter and args.work and args.label):
        parser.error("--model, --adapter, --work and --label are required (or --predict SHAPE)")
    args.work.mkdir(parents=True, exist_ok=True)
    figures = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results: dict[str, Any] = {}
    for case in args.cases.split(","):
        started = time.monotonic()
        if args.estimate_only:
            if case not in figures.get(args.label, {}):
                continue
            old = figures[args.label][case]
            measured = {"peak": old["peak_mb"] * 1e6, "before": old["before_mb"] * 1e6, "wall_s": old["wall_s"],
                        **{k: v for k, v in old.items() if not k.endswith(("_mb", "ratio")) and k != "wall_s"}}
        else:
            measured = run_case(case, args.model, args.adapter, args.work)
        guess = None if args.no_estimate else estimate(case, args.model, args.adapter, args.work)
        results[case] = {"peak_mb": round(measured["peak"] / 1e6, 1), "before_mb": round(measured["before"] / 1e6, 1),
                         "wall_s": measured["wall_s"],
                         **({"estimate_mb": round(guess["bytes"] / 1e6, 1),
                             "ratio": round(guess["bytes"] / measured["peak"], 2),
                             "parts_mb": {k: round(v / 1e6, 1) for k, v in guess["parts"].items()}} if guess else {}),
                         **{k: v for k, v in measured.items() if k not in ("peak", "before", "wall_s")}}
        print(f"{case:16s} peak {results[case]['peak_mb']:9,.1f} MB"
              + (f"  estimate {results[case]['estimate_mb']:9,.1f} MB (x{results[case]['ratio']})" if guess else "")
              + f"  [{time.monotonic() - started:.0f} s]", flush=True)
    figures[args.label] = {**figures.get(args.label, {}), **results}
    args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
