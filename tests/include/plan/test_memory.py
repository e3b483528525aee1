"""The stage estimates: sizes from headers, formulas that grow with what they should, and close to the measured
peaks of the real stages on the tiny model (each run in a child process shaped like a task process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from include.config.sections import FidelitySettings, ImatrixSettings, MergeSettings, QuantizeSettings
from include.plan import memory
from include.plan.shapes import model_shape
from include.plan.stages import adapter_bound, convert_stage, merge_stage, quantize_stage, run_estimates, smoke_stage
from include.resources.sampler import PeakSampler
from tests.conftest import ROOT

MB = 1_000_000
# One stage's engine call, the way its operator makes it, after the imports an Airflow task process holds.
STAGE = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import airflow.sdk.execution_time.task_runner
import operators.operators.gguf, operators.operators.merge, operators.sensors.health
from include.config.sections import FidelitySettings
from include.gguf.toolchain import pinned_toolchain
case, base, adapter, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
fidelity = FidelitySettings()
if case == "merge":
    from include.merge.backends import merge_model
    merge_model(base, adapter, work / "merged", backend="streaming")
elif case == "convert":
    from include.gguf import tokenizer
    from include.gguf.convert import convert_to_gguf
    with ThreadPoolExecutor(max_workers=1) as pool:
        reference = pool.submit(tokenizer.hf_tokenization, base)
        summary = convert_to_gguf(base, work / "m-F16.gguf", toolchain=pinned_toolchain(), fused_adapter=adapter)
        tokenizer.compare_tokenization(summary.path, base, reference=reference.result())
elif case == "fidelity":
    from include.gguf.fidelity import compare_logits, evaluation_text, perplexity
    compare_logits(base, work / "m-F16.gguf", prompts=fidelity.prompts, max_abs_diff=1e9, max_kl=1e9,
                   fused_adapter=adapter)
    perplexity(work / "m-F16.gguf", evaluation_text(fidelity).text, n_ctx=fidelity.n_ctx)
elif case == "quantize":
    from include.gguf.quantize import quantize_gguf
    quantize_gguf(work / "m-F16.gguf", work / "m-Q8_0.gguf", "Q8_0", toolchain=pinned_toolchain())
elif case == "smoke":
    from include.health.endpoint import check_chat
    from include.health.smoke import serve_gguf
    with serve_gguf(work / "m-Q8_0.gguf", model_id="m") as url:
        check_chat(url, model_id="m", system_prompt="Be brief.", prompt="Say hello.", max_tokens=8)
print("done")
"""


def measure(case: str, base: Path, adapter: Path, work: Path) -> int:
    """Peak RssAnon (bytes) of the stage's child process and everything it starts."""
    proc = subprocess.Popen([sys.executable, "-c", STAGE, case, str(base), str(adapter), str(work)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakSampler(proc.pid, 0.05) as sampler:
        output = proc.communicate()[0]
    assert proc.returncode == 0, output[-2000:]
    return sampler.peak


def test_estimates_are_close_to_the_measured_peaks_of_the_tiny_model(demo_inputs, tmp_path):
    base, adapter = demo_inputs.base, demo_inputs.training_box / "checkpoint-20"
    fidelity = FidelitySettings()
    measured = {case: measure(case, base, adapter, tmp_path)
                for case in ("merge", "convert", "fidelity", "quantize", "smoke")}
    gate_phases = memory.convert_phases(model_shape(base), fused=True, fidelity=fidelity, imatrix=ImatrixSettings())
    estimated = {
        "merge": merge_stage(base, adapter, MergeSettings(backend="streaming")).peak_bytes,
        "convert": gate_phases["converter"].peak_bytes,
        "fidelity": max(gate_phases["logits"].peak_bytes, gate_phases["perplexity"].peak_bytes),
        "quantize": quantize_stage(tmp_path / "m-F16.gguf", "Q8_0", None).peak_bytes,
        "smoke": smoke_stage(tmp_path / "m-Q8_0.gguf").peak_bytes,
    }
    ratios = {case: round(estimated[case] / measured[case], 2) for case in measured}
    print(json.dumps({"measured_mb": {k: round(v / MB) for k, v in measured.items()}, "ratios": ratios}))
    # Generous: the tiny model's peaks are mostly fixed costs (Python, torch, the task process); the 1.5B shape's
    # figures (docs/operations.md) check the size-dependent terms.
    assert all(0.8 <= r <= 2.5 for r in ratios.values()), ratios
    assert convert_stage(base, str(adapter), QuantizeSettings(), fidelity).peak_bytes == max(
        e.peak_bytes for e in gate_phases.values())


def test_shapes_and_formulas_from_headers(demo_inputs, tmp_path):
    shape = model_shape(demo_inputs.base)
    assert shape.parameters == shape.matrix_elements + shape.vector_elements
    assert shape.vocab == 1000 and shape.layers == 2 and shape.kv_dim > 0
    _, elements = shape.largest_tensor
    assert elements == max(shape.embedding_elements, shape.head_elements, shape.largest_block_tensor)
    _, size = shape.largest_layer
    assert size == 4 * max(shape.largest_block[1], shape.embedding_elements, shape.head_elements)
    assert memory.goal_bytes(shape) == 2_000 * MB + int(1.5 * size)
    # Each size-dependent term grows with its size, by the stated factor.
    dims = memory.Dims(largest_elements=100_000_000, vocab=150_000, layers=28, kv_dim=512)
    bigger = memory.Dims(largest_elements=200_000_000, vocab=150_000, layers=28, kv_dim=512)
    grow = [memory.quantize_tool_estimate(d, "Q8_0").peak_bytes for d in (dims, bigger)]
    assert grow[1] - grow[0] == pytest.approx(100_000_000 * (4 + 8.5 / 8))
    assert memory.smoke_estimate(dims).parts["kv_cache"] == 2 * 2048 * 28 * 512 * 2
    assert memory.perplexity_estimate(dims, 256).parts["logits"] == 16 * 256 * 150_000
    assert adapter_bound(shape) == 64 * shape.block_rows_cols * 4


def test_a_run_lists_every_stage_and_follows_the_config(demo_inputs):
    shape = model_shape(demo_inputs.base)
    stages = run_estimates(shape, merge=MergeSettings(), quantize=QuantizeSettings(), fidelity=FidelitySettings(),
                           quant_types=["Q8_0", "Q4_K_M"])
    assert [e.stage for e in stages] == ["download", "merge", "convert", "quantize", "smoke", "others"]
    fused = {e.stage: e for e in stages}
    peft = {e.stage: e for e in run_estimates(shape, merge=MergeSettings(backend="peft"), quantize=QuantizeSettings(),
                                              fidelity=None, quant_types=["Q8_0"], smoke=False)}
    assert "smoke" not in peft and "model" in peft["merge"].parts and "merge.backend: fused" in peft["merge"].fix
    assert "prefetch" in fused["convert"].parts and "prefetch" not in peft["convert"].parts  # peft merges first
    assert fused["quantize"].peak_bytes >= memory.quantize_tool_estimate(memory.Dims.of(shape), "Q4_K_M").peak_bytes
