"""The llama.cpp quantization type names of the pinned toolchain, known without importing llama_cpp.

The DAG file offers these in the trigger form (a JSON-schema enum), so they must be available at parse
time, where importing llama_cpp (a native library) is not allowed. A test checks this table against the
``LLAMA_FTYPE_*`` constants of the installed llama-cpp-python, so it cannot drift from the build.
"""

from __future__ import annotations

# The file types llama-cpp-python 0.3.36 accepts (LLAMA_FTYPE_MOSTLY_* and ALL_F32), in llama.h order.
QUANT_TYPES: tuple[str, ...] = (
    "F32", "F16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S",
    "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_XXS", "IQ2_XS", "Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
    "IQ3_S", "IQ3_M", "IQ2_S", "IQ2_M", "IQ4_XS", "IQ1_M", "BF16", "TQ1_0", "TQ2_0", "MXFP4_MOE", "NVFP4",
    "Q1_0", "Q2_0",
)

# Rough bits per weight of each type, for disk-space estimates before anything is produced.
APPROX_BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_0": 5.5, "Q5_1": 6.0, "Q5_K_S": 5.5,
    "Q5_K_M": 5.7, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K_S": 4.6, "Q4_K_M": 4.9, "IQ4_NL": 4.5, "IQ4_XS": 4.3,
    "Q3_K_S": 3.5, "Q3_K_M": 3.9, "Q3_K_L": 4.3, "IQ3_S": 3.5, "IQ3_M": 3.7, "IQ3_XS": 3.3, "IQ3_XXS": 3.1,
    "Q2_K": 3.0, "Q2_K_S": 2.8, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.3, "IQ2_XXS": 2.1, "IQ1_M": 1.8,
    "IQ1_S": 1.6, "TQ1_0": 1.7, "TQ2_0": 2.1, "Q1_0": 1.5, "Q2_0": 2.5, "MXFP4_MOE": 4.3, "NVFP4": 4.5,
}

def approx_bits_per_weight(quant: str) -> float:
    """The rough size of one weight in ``quant`` (16 for unknown names: an estimate errs on the large side)."""
    return APPROX_BITS_PER_WEIGHT.get(quant.upper(), 16.0)
