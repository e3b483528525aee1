"""Peak anonymous memory (RssAnon) of the fidelity gate: the old full-model HF reference vs the layer-streamed one.

    .venv/bin/python bench/scale/measure.py --model DIR --f16 F16.gguf [--quant Q4_K_M.gguf] [--label NAME]
                                            [--out bench/scale/results.json] [--cases hf-old,hf-new,...]

Each case runs in a fresh process; this process samples the child's ``RssAnon`` (``/proc/<pid>/status``) every
5 ms and keeps the peak. RssAnon, not RSS: pages of files read through mmap (the GGUF that llama.cpp maps,
shared libraries) are file-backed and the kernel can drop them; anonymous pages are what can exhaust RAM.
The child reports its own RssAnon just before the measured call (``before_mb``: Python, numpy and the module).

Cases: ``hf-old`` / ``hf-new`` (the HF reference alone: ``_hf_logits`` of the fidelity module as of commit
``OLD_COMMIT``, a full float32 ``from_pretrained``, vs today's streamed one), ``compare-old`` / ``compare-new``
(the whole ``compare_logits`` against the f16 GGUF, default prompts), ``ppl-old`` / ``ppl-new`` on the f16 and
the quant GGUF (``perplexity`` with llama.cpp's default CPU weight repacking vs the gate's mmap-only loading).
``goal_mb`` is the issue's bound: 2 GB + 1.5 x the largest decoder layer in float32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "44994ae"  # the last commit whose fidelity gate loaded the whole model
CASES = ("hf-old", "hf-new", "compare-old", "compare-new", "ppl-old", "ppl-new")

_CHILD = """
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
case, model, f16, quant = sys.argv[3:7]
if case.endswith("-old"):
    import old_fidelity as fidelity
else:
    from include.gguf import fidelity
from pathlib import Path
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
config = fidelity.fidelity_settings({})  # the old module's FidelityConfig or today's FidelitySettings
limit = getattr(config, "max_abs_logit_diff", None) or getattr(config, "max_abs_diff", None)
text = fidelity.evaluation_text(config).text if hasattr(fidelity, "evaluation_text") else config.eval_text
before, started, result = anon(), time.monotonic(), {}
if case.startswith("hf-"):
    ids, logits = fidelity._hf_logits(Path(model), config.prompts)
    result = {"tokens": sum(map(len, ids)), "vocab": int(logits[0].shape[-1])}
elif case.startswith("compare-"):
    result = fidelity.compare_logits(Path(model), Path(f16), prompts=config.prompts,
                                     max_abs_diff=limit, max_kl=config.max_kl, mode="warn")
else:
    for kind, path in (("f16", f16), ("quant", quant)):
        if path != "-":
            result["ppl_" + kind] = fidelity.perplexity(Path(path), text, n_ctx=config.n_ctx)
print(json.dumps({"before_mb": round(before, 1), "wall_s": round(time.monotonic() - started, 2), **result}))
"""


def largest_layer_fp32_mb(model_dir: Path) -> float:
    """The largest decoder layer's size in float32 (MB), from the safetensors headers."""
    from include.merge.safetensors_io import list_model_tensors

    sizes: dict[str, int] = {}
    for name, info in list_model_tensors(model_dir).items():
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            elements = 1
            for dim in info.shape:
                elements *= dim
            sizes[layer] = sizes.get(layer, 0) + 4 * elements
    return max(sizes.values()) / 2**20


def run_case(case: str, model: Path, f16: Path, quant: Path | None, old_dir: Path) -> dict[str, Any]:
    """Run one case in a child; its peak RssAnon (MB) sampled from outside, and what it reports."""
    argv = [sys.executable, "-c", _CHILD, str(ROOT), str(old_dir), case, str(model), str(f16), str(quant or "-")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status, peak = Path(f"/proc/{proc.pid}/status"), 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                peak = max(peak, next(int(x.split()[1]) for x in status.read_text().splitlines()
                                      if x.startswith("RssAnon:")))
            except (OSError, StopIteration):
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{case} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return {"peak_rss_anon_mb": round(peak / 1024, 1), **json.loads(out.decode().strip().splitlines()[-1])}


def main() -> None:
    """Measure the cases on one model and merge the figures into the results file under ``--label``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="HF model dir (merged)")
    parser.add_argument("--f16", type=Path, required=True, help="its f16 GGUF")
    parser.add_argument("--quant", type=Path, default=None, help="a quantized GGUF (e.g. Q4_K_M) for ppl cases")
    parser.add_argument("--label", default=None)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "scale" / "results.json")
    args = parser.parse_args()
    layer_mb = largest_layer_fp32_mb(args.model)
    record: dict[str, Any] = {"model": str(args.model), "largest_layer_fp32_mb": round(layer_mb, 1),
                              "goal_mb": round(2048 + 1.5 * layer_mb, 1), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="fidelity-old-") as old_dir:
        source = subprocess.run(["git", "show", f"{OLD_COMMIT}:include/gguf/fidelity.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (Path(old_dir) / "gguf").mkdir()
        (Path(old_dir) / "gguf" / "old_fidelity.py").write_text(source)
        (Path(old_dir) / "data").symlink_to(ROOT / "include" / "data")  # its built-in eval text
        for case in args.cases.split(","):
            record["cases"][case] = run_case(case, args.model, args.f16, args.quant, Path(old_dir) / "gguf")
            print(case, json.dumps(record["cases"][case]), flush=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    label = args.label or args.model.name
    if label in results:  # cases measured earlier (other --cases) are kept unless measured again
        record["cases"] = {**results[label].get("cases", {}), **record["cases"]}
    results[label] = record
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
