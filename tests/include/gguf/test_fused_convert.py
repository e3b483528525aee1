"""merge.backend fused: the LoRA merged inside the converter's tensor stream gives the merge-then-convert GGUF."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from include.errors import GGUFError, MergeError
from include.gguf.convert import convert_to_gguf
from include.gguf.fidelity import compare_logits
from include.gguf.toolchain import pinned_toolchain
from include.merge.fused import check_fusable
from include.merge.streaming import merge_lora
from tests.conftest import ROOT

METADATA = {"general.name": "fused-check", "general.version": "v1"}


@pytest.fixture(scope="module")
def pair(demo_inputs, tmp_path_factory) -> dict[str, Path]:
    """The reference: checkpoint-20 merged with merge_lora, then converted."""
    tmp = tmp_path_factory.mktemp("fused")
    adapter = demo_inputs.training_box / "checkpoint-20"
    merge_lora(demo_inputs.base, adapter, tmp / "merged")
    convert_to_gguf(tmp / "merged", tmp / "ref.gguf", toolchain=pinned_toolchain(), metadata=METADATA)
    return {"tmp": tmp, "base": demo_inputs.base, "adapter": adapter, "merged": tmp / "merged",
            "ref": tmp / "ref.gguf"}


def test_fused_conversion_is_byte_identical_to_merge_then_convert(pair, caplog) -> None:
    from include.gguf.reader import inspect_gguf

    fused = convert_to_gguf(pair["base"], pair["tmp"] / "fused.gguf", toolchain=pinned_toolchain(),
                            metadata=METADATA, fused_adapter=pair["adapter"])
    assert fused.sha256 == inspect_gguf(pair["ref"]).sha256
    plain = convert_to_gguf(pair["base"], pair["tmp"] / "plain.gguf", toolchain=pinned_toolchain(),
                            metadata=METADATA)
    assert plain.sha256 != fused.sha256  # the base alone differs: the merge really happened


def test_bench_front_runs_the_engine(pair) -> None:
    out = pair["tmp"] / "bench-fused.gguf"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gguf" / "fused.py"), "--base", str(pair["base"]),
                           "--adapter", str(pair["adapter"]), "--", "--outfile", str(out), "--outtype", "f16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged 14 tensors inside the conversion" in proc.stdout  # 2 layers x 7 target modules


def test_fidelity_gate_merges_in_memory_for_a_fused_gguf(pair) -> None:
    """The gate's HF side is base + the same merged tensors: the figures equal the merged model's."""
    prompts = ["The capital of France is", "def add(a, b):"]
    written = compare_logits(pair["merged"], pair["ref"], prompts=prompts, max_abs_diff=1.0, max_kl=0.01)
    fused = compare_logits(pair["base"], pair["ref"], prompts=prompts, max_abs_diff=1.0, max_kl=0.01,
                           fused_adapter=pair["adapter"])
    assert fused["max_abs_diff"] == written["max_abs_diff"] and fused["mean_kl"] == written["mean_kl"]
    unmerged = compare_logits(pair["base"], pair["ref"], prompts=prompts, max_abs_diff=1.0, max_kl=0.01, mode="warn")
    assert unmerged["max_abs_diff"] > written["max_abs_diff"]  # without the adapter the HF side differs


def test_adapter_of_another_base_is_refused_before_converting(pair, demo_inputs) -> None:
    with pytest.raises(MergeError, match="base"):
        check_fusable(pair["base"], pair["adapter"], expected_base="/models/some-other-base")
    out = pair["tmp"] / "never.gguf"
    with pytest.raises(GGUFError, match="adapter_config"):
        convert_to_gguf(pair["base"], out, toolchain=pinned_toolchain(), fused_adapter=pair["tmp"])  # not an adapter
    assert not out.exists() and not list(pair["tmp"].glob("never*"))
