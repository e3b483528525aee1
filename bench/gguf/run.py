"""Benchmark the GGUF stage: the engine (and operator) path vs the pinned llama.cpp tools run directly, same run.

    .venv/bin/python bench/gguf/run.py [--repeats 3] [--quant Q4_K_M] [--quick] [--no-operators] [--no-fidelity]
                                       [--no-fused]

Model: the generated ~0.5B bf16 Llama of bench/merge/models.py (hidden 1024, 32 layers, vocab 32000) with
the tiny model's SentencePiece tokenizer (the converter pads the vocab to 32000), assembled under
``~/.cache/lora-deploy/bench/gguf-0p5b`` (symlinks, no copy). ``--quick``: the tiny test model, one repeat.

Cases, each in its own process (wall time start to exit, peak RSS of the process tree from GNU time),
interleaved per repeat, warm page cache; the median of the repeats counts:

- ``raw``: ``convert_hf_to_gguf.py`` (pinned, its gguf-py on PYTHONPATH) to f16, then the quantizer the
  engine uses (the pinned ``llama-quantize``, or llama-cpp-python's ``llama_model_quantize`` without it);
- ``engine``: ``include.gguf.convert.convert_to_gguf`` + ``quantize_gguf`` + ``check_quant_used`` (read back, sha256);
- ``operators``: ``GGUFConvertOperator.execute`` + ``GGUFQuantizeOperator.execute`` with a minimal context
  (content-addressed store, disk preflight, pre-tokenizer hash, tokenizer comparison), fidelity off;
- ``fused``: base + LoRA adapter -> f16 GGUF in one pass (bench/gguf/fused.py: the merge applied per
  tensor inside the converter's stream), no merged model on disk.

``overhead_vs_raw`` = median(engine) / median(raw) - 1 (goal <= 5%); ``fused_ratio_vs_convert`` =
median(fused) / median(the raw case's convert step on the base alone) (goal <= 1.1). The fidelity gate (logits vs the
merged model, perplexity of f16 and the quant) is timed once on its own. Writes bench/results/gguf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "merge")]

PY = sys.executable
CACHE = Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy")) / "bench"
RAW_QUANTIZE = """
import ctypes, sys, llama_cpp
src, dst, name = sys.argv[1:4]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
"""


def bench_model(quick: bool) -> tuple[Path, Path]:
    """The model directory to convert and a LoRA adapter for it: the tiny model (quick) or the 0.5B one."""
    from tests.fixtures.tiny_model import make_base_model, make_lora_adapter

    tiny, tiny_lora = CACHE / "gguf-tiny", CACHE / "gguf-tiny-lora"
    if not (tiny / "config.json").is_file():
        make_base_model(tiny)
    if not (tiny_lora / "adapter_config.json").is_file():
        make_lora_adapter(tiny, tiny_lora, seed=1)
    if quick:
        return tiny, tiny_lora
    from models import make

    base, adapter = make("0p5b")
    out = CACHE / "gguf-0p5b"
    if not (out / "config.json").is_file():
        tmp = CACHE / ".gguf-0p5b.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for file in base.iterdir():
            (tmp / file.name).symlink_to(file)
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copyfile(tiny / name, tmp / name)
        tmp.rename(out)
    return out, adapter


def timed(argv: list[str], scratch: Path) -> dict[str, float]:
    """Run ``argv`` in a fresh process under GNU time: wall and CPU (user+sys) seconds, peak RSS (MB).

    CPU time and peak RSS cover the process and its waited-for children (the converter, the quantizer).
    """
    rss_file = scratch / "rss.txt"
    started = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *argv], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    rss_kb, user, system = rss_file.read_text().split()[-3:]
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "rss_mb": int(rss_kb) / 1024}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def raw_case(model: Path, out: Path, quant: str, scratch: Path) -> dict[str, float]:
    """The pinned converter and quantizer run by hand, no engine around them."""
    from include.gguf.toolchain import pinned_toolchain

    toolchain = pinned_toolchain()
    f16, q = out / "raw-f16.gguf", out / f"raw-{quant}.gguf"
    convert = timed(["env", f"PYTHONPATH={toolchain.gguf_py}", PY, str(toolchain.converter), str(model),
                     "--outfile", str(f16), "--outtype", "f16"], scratch)
    binary = toolchain.tool("llama-quantize")
    argv = [str(binary), str(f16), str(q), quant] if binary else [PY, "-c", RAW_QUANTIZE, str(f16), str(q), quant]
    quantize = timed(argv, scratch)
    return {"wall_s": convert["wall_s"] + quantize["wall_s"], "cpu_s": convert["cpu_s"] + quantize["cpu_s"],
            "rss_mb": max(convert["rss_mb"], quantize["rss_mb"]), "convert_s": convert["wall_s"],
            "convert_cpu_s": convert["cpu_s"], "quantize_s": quantize["wall_s"]}


def fused_case(model: Path, adapter: Path, out: Path, scratch: Path) -> dict[str, float]:
    """Adapter + base -> f16 GGUF in one pass (bench/gguf/fused.py), no merged model written."""
    return timed([PY, str(Path(__file__).with_name("fused.py")), "--base", str(model), "--adapter", str(adapter),
                  "--", "--outfile", str(out / "fused-f16.gguf"), "--outtype", "f16"], scratch)


def child_engine(model: Path, out: Path, quant: str) -> None:
    """Child process body of the ``engine`` case."""
    from include.gguf.convert import convert_to_gguf
    from include.gguf.quantize import check_quant_used, quantize_gguf
    from include.gguf.toolchain import pinned_toolchain

    toolchain = pinned_toolchain()
    f16 = convert_to_gguf(model, out / "engine-f16.gguf", toolchain=toolchain, outtype="f16",
                          metadata={"general.name": "bench", "general.version": "v1"})
    summary = quantize_gguf(Path(f16.path), out / f"engine-{quant}.gguf", quant, toolchain=toolchain)
    check_quant_used(summary, quant)


class _TaskInstance:
    """The part of a TaskInstance the GGUF operators use: ``xcom_push``."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def child_operators(model: Path, out: Path, quant: str) -> None:
    """Child process body of the ``operators`` case: both operators' ``execute`` with a minimal context."""
    from include.store.hashing import sha256_file
    from operators.operators.gguf import GGUFConvertOperator, GGUFQuantizeOperator

    merged = {"path": str(model), "sha256": sha256_file(model / "config.json")}
    settings: dict[str, Any] = {"outtype": "f16", "check_tokenizer": True}
    context: dict[str, Any] = {"ti": _TaskInstance()}
    root = str(out / "store")
    convert = GGUFConvertOperator(task_id="convert", model="bench", merged=merged, adapter={"version": "v1"},
                                  quant_types=[quant], artifact_root=root, settings=settings, fidelity=None)
    converted = convert.execute(context)
    quantize = GGUFQuantizeOperator(task_id="quantize", model="bench", converted=converted, quant_type=quant,
                                    artifact_root=root, settings=settings, fidelity=None)
    quantize.execute(context)


def child_fidelity(model: Path, out: Path, quant: str) -> None:
    """The fidelity gate on the model (f16 and ``quant`` built first, untimed); prints figures as JSON."""
    from include.gguf.convert import convert_to_gguf
    from include.gguf.fidelity import (
        check_perplexity,
        compare_logits,
        evaluation_text,
        fidelity_settings,
        max_ratio_for,
        perplexity,
    )
    from include.gguf.quantize import quantize_gguf
    from include.gguf.toolchain import pinned_toolchain

    f16, q = out / "fid-f16.gguf", out / f"fid-{quant}.gguf"
    convert_to_gguf(model, f16, toolchain=pinned_toolchain(), outtype="f16")
    quantize_gguf(f16, q, quant, toolchain=pinned_toolchain())
    q8 = out / "fid-Q8_0.gguf"
    quantize_gguf(f16, q8, "Q8_0", toolchain=pinned_toolchain())
    config = fidelity_settings({})
    assert config is not None
    started = time.monotonic()
    logits = compare_logits(model, f16, prompts=config.prompts, max_abs_diff=config.max_abs_logit_diff,
                            max_kl=config.max_kl, mode="warn")
    logits_s = time.monotonic() - started
    text = evaluation_text(config).text
    ppl_f16 = perplexity(f16, text, n_ctx=config.n_ctx)
    checks = {}
    for name, path in ((quant, q), ("Q8_0", q8)):
        checks[name] = check_perplexity(name, perplexity(path, text, n_ctx=config.n_ctx), ppl_f16,
                                        max_ratio=max_ratio_for(config, name), mode="warn")
    total = time.monotonic() - started
    print(json.dumps({"logits": logits, "perplexity": checks, "logits_s": round(logits_s, 2),
                      "gate_s": round(total, 2)}))


def run_child(kind: str, model: Path, out: Path, quant: str) -> None:
    """Dispatch a child process."""
    {"engine": child_engine, "operators": child_operators, "fidelity": child_fidelity}[kind](model, out, quant)


def main() -> None:
    """Run the benchmark and write the JSON record."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat (used by the test suite)")
    parser.add_argument("--no-operators", action="store_true")
    parser.add_argument("--no-fidelity", action="store_true")
    parser.add_argument("--no-fused", action="store_true", help="skip the fused merge+convert case")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gguf.json")
    parser.add_argument("--scratch", type=Path, default=CACHE / "scratch-gguf")
    parser.add_argument("--child", choices=("engine", "operators", "fidelity"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.model, args.scratch, args.quant)
        return
    repeats = 1 if args.quick else args.repeats
    model, adapter = bench_model(args.quick)
    scratch = args.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    for file in model.iterdir():  # warm the page cache
        with file.open("rb") as handle:
            while handle.read(64 << 20):
                pass
    cases = ["raw", "engine"] + ([] if args.no_operators or args.quick else ["operators"])
    cases += [] if args.no_fused else ["fused"]
    runs: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
    errors: dict[str, str] = {}
    for rep in range(repeats):
        for case in cases:
            if case in errors:
                continue
            out = scratch / case
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            try:
                if case == "raw":
                    got = raw_case(model, out, args.quant, scratch)
                elif case == "fused":
                    got = fused_case(model, adapter, out, scratch)
                else:
                    got = timed([PY, __file__, "--child", case, "--model", str(model), "--scratch", str(out),
                                 "--quant", args.quant], scratch)
            except SystemExit as err:
                if case == "operators":  # optional: recorded, not fatal
                    errors[case] = str(err)[-1500:]
                    print(f"operators case failed: {errors[case]}", flush=True)
                    continue
                raise
            finally:
                shutil.rmtree(out, ignore_errors=True)
            runs[case].append(got)
            print(f"rep {rep + 1} {case}: " + json.dumps({k: round(v, 2) for k, v in got.items()}), flush=True)
    medians = {case: {key: round(statistics.median(r[key] for r in got), 2) for key in got[0]}
               for case, got in runs.items() if got}
    record: dict[str, Any] = {
        "overhead_vs_raw": round(medians["engine"]["wall_s"] / medians["raw"]["wall_s"] - 1, 4),
        "goals": {"overhead_vs_raw": "<= 0.05"},
        "quick": args.quick,
        "quant": args.quant,
        "repeats": repeats,
        "cases": medians,
        "best": {case: {key: round(min(r[key] for r in got), 2) for key in got[0]}
                 for case, got in runs.items() if got},
        "runs": {case: [{k: round(v, 2) for k, v in r.items()} for r in got] for case, got in runs.items()},
    }
    record["overhead_vs_raw_cpu"] = round(medians["engine"]["cpu_s"] / medians["raw"]["cpu_s"] - 1, 4)
    if "operators" in medians:
        record["operators_overhead_vs_raw"] = round(medians["operators"]["wall_s"] / medians["raw"]["wall_s"] - 1, 4)
        record["operators_overhead_vs_raw_cpu"] = round(
            medians["operators"]["cpu_s"] / medians["raw"]["cpu_s"] - 1, 4)
    if "fused" in medians:
        record["fused_ratio_vs_convert"] = round(medians["fused"]["wall_s"] / medians["raw"]["convert_s"], 4)
        record["fused_ratio_vs_convert_cpu"] = round(medians["fused"]["cpu_s"] / medians["raw"]["convert_cpu_s"], 4)
        record["goals"]["fused_ratio_vs_convert"] = "<= 1.1"
    if errors:
        record["errors"] = errors
    if not args.no_fidelity and not args.quick:
        out = scratch / "fidelity"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        proc = subprocess.run([PY, __file__, "--child", "fidelity", "--model", str(model), "--scratch", str(out),
                               "--quant", args.quant], cwd=ROOT, env=_env(), capture_output=True, text=True)
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0:
            raise SystemExit(f"fidelity child failed:\n{proc.stderr[-3000:]}")
        record["fidelity"] = json.loads(proc.stdout.strip().splitlines()[-1])
    record["model"] = {"path": str(model), "bytes": sum(p.stat().st_size for p in model.glob("*.safetensors"))}
    flags = " --quick" if args.quick else f" --repeats {repeats} --quant {args.quant}"
    record["command"] = f".venv/bin/python bench/gguf/run.py{flags}"
    record["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    record["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps({k: record.get(k) for k in ("overhead_vs_raw", "fused_ratio_vs_convert", "cases")}, indent=2))


if __name__ == "__main__":
    main()
