"""Disk: GGUF sizes from tensor headers against real llama.cpp files, and the artifact root's high-water mark."""

from __future__ import annotations

from pathlib import Path

import pytest

from include.gguf.quant_types import gguf_bytes, output_bits
from include.gguf.reader import inspect_gguf
from include.plan import estimate_outputs, high_water
from include.plan.disk import imatrix_bytes
from include.plan.shapes import model_shape
from tests.gguf_helpers import tiny_gguf


@pytest.mark.parametrize("quant", ["f16", "Q8_0", "Q4_K_M"])
def test_gguf_sizes_from_headers_are_within_ten_percent_of_the_real_files(gguf_root: Path, quant: str):
    real = inspect_gguf(tiny_gguf(gguf_root, quant), with_sha256=False).bytes
    shape = model_shape(gguf_root / "tiny-base")
    estimated = {o["name"]: o["bytes"] for o in estimate_outputs(shape.parameters, shape.stored_bytes, "fused", "f16",
                                                                  ["Q8_0", "Q4_K_M"], shape=shape)}
    assert estimated["merged"] == 0  # fused: nothing merged on disk
    assert abs(estimated[quant.upper()] / real - 1) < 0.10, (estimated, real)


def test_the_measured_1_5b_bits_reproduce_its_files():
    # Qwen2.5-1.5B shape (tied embedding 151936 x 1536): the real files were 984,107,584 (Q4_K_M) and
    # 1,644,632,128 (Q8_0) bytes (bench/scale/stage_memory.py, docs/operations.md).
    sizes = {"matrix_elements": 1_543_569_408, "output_elements": 233_373_696, "vector_elements": 144_896,
             "vocab": 151_936}
    assert gguf_bytes("Q4_K_M", **sizes) == pytest.approx(984_107_584, rel=0.002)
    assert gguf_bytes("Q8_0", **sizes) == pytest.approx(1_644_632_128, rel=0.002)
    assert output_bits("Q4_K_M") == 6.5625 and output_bits("Q8_0") == 8.5 and output_bits("Q4_K_M", "q8_0") == 8.5


def test_the_high_water_mark_adds_everything_the_run_writes(gguf_root: Path):
    tiny_gguf(gguf_root, "f16")
    shape = model_shape(gguf_root / "tiny-base")
    streaming = estimate_outputs(shape.parameters, shape.stored_bytes, "auto", "f16", ["Q8_0"], shape=shape)
    parts = high_water(streaming, adapter_bytes=1000, imatrix=imatrix_bytes(shape))
    assert set(parts) == {"adapter", "merged", "F16", "Q8_0", "imatrix"} and parts["merged"] == shape.stored_bytes
    assert parts["imatrix"] == shape.cols_total * 4 + shape.matrices * 1024
    fused = high_water(estimate_outputs(shape.parameters, shape.stored_bytes, "fused", "f16", ["Q8_0"], shape=shape),
                       adapter_bytes=1000)
    assert "merged" not in fused and sum(fused.values()) < sum(parts.values())
