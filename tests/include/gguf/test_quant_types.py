"""The parse-time table of quantization types matches the llama-cpp-python build."""

from __future__ import annotations

from include.gguf.quant_types import APPROX_BITS_PER_WEIGHT, QUANT_TYPES, approx_bits_per_weight
from include.gguf.quantize import known_quant_types


def test_table_matches_the_installed_llama_cpp():
    assert set(QUANT_TYPES) == set(known_quant_types()), "include/gguf/quant_types.py drifted from llama-cpp-python"


def test_every_type_has_a_size_estimate():
    assert set(APPROX_BITS_PER_WEIGHT) == set(QUANT_TYPES)
    assert approx_bits_per_weight("q4_k_m") == 4.9
    assert approx_bits_per_weight("NOPE") == 16.0
