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

# Bits per weight of the ggml block types (block bytes x 8 / weights per block, as include/gguf/reader.py sizes them).
BLOCK_BITS: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5, "Q3_K": 3.4375,
    "Q2_K": 2.625, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_0": 4.5, "Q4_1": 5.0, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
}
# Measured bits per weight of the 2-D tensors other than the output head (llama-quantize's K-quant mixes put a
# share of attn_v/ffn_down in Q6_K), on the Qwen2.5-1.5B shape (28 layers): Q4_K_M 4.812, Q5_K_M 5.661, Q8_0 8.5.
# Types without an entry use APPROX_BITS_PER_WEIGHT.
LAYER_BITS: dict[str, float] = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q4_K_M": 4.812,
                                "Q5_K_M": 5.661, "Q6_K": 6.5625, "Q4_0": 4.5, "Q5_0": 5.5}
# llama-quantize's output head (or the token embedding when it is tied to the head) is Q6_K for every type but
# these (Q8_0 and the float types keep theirs; the smallest IQ types use Q5_K).
_OUTPUT_KEEPS = ("F32", "F16", "BF16", "Q8_0")
_OUTPUT_Q5_K = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
METADATA_BYTES_PER_TOKEN = 28  # vocabulary strings, scores and types (4.01 MB for 151936 tokens, measured)


def approx_bits_per_weight(quant: str) -> float:
    """The rough size of one weight in ``quant`` (16 for unknown names: an estimate errs on the large side)."""
    return APPROX_BITS_PER_WEIGHT.get(quant.upper(), 16.0)


def output_bits(quant: str, override: str | None = None) -> float:
    """Bits per weight of the output head in a ``quant`` GGUF (``override``: quantize.output_tensor_type)."""
    if override:
        return BLOCK_BITS.get(override.upper(), 16.0)
    name = quant.upper()
    if name in _OUTPUT_KEEPS:
        return approx_bits_per_weight(name)
    return BLOCK_BITS["Q5_K"] if name in _OUTPUT_Q5_K else BLOCK_BITS["Q6_K"]


def gguf_bytes(quant: str, *, matrix_elements: int, output_elements: int, vector_elements: int, vocab: int,
               output_type: str | None = None) -> int:
    """Estimated size of a GGUF of type ``quant`` (an outtype such as F16, or a quantization type) from tensor headers.

    2-D tensors at the type's measured layer bits (:data:`LAYER_BITS`), the output head (``output_elements``: the
    lm_head, or the embedding when tied) at :func:`output_bits`, 1-D tensors in F32 (the converter keeps norms and
    biases in float32), plus the vocabulary in the metadata. Exact for the measured shape; within a few percent for
    others (the K-quant mixes depend on the layer count).
    """
    name = quant.upper()
    layer_bits = LAYER_BITS.get(name, approx_bits_per_weight(name))
    head_bits = output_bits(name, output_type) if name not in ("F32", "F16", "BF16") else layer_bits
    data = (matrix_elements - output_elements) * layer_bits / 8 + output_elements * head_bits / 8
    return int(data + vector_elements * 4 + vocab * METADATA_BYTES_PER_TOKEN + 65536)
