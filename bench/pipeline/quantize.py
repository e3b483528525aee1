"""Quantize with the llama-cpp-python binding (the engine's quantizer) when no llama-quantize binary exists.

    python bench/pipeline/quantize.py SRC DST TYPE
"""

from __future__ import annotations

import ctypes
import sys

import llama_cpp

if __name__ == "__main__":
    src, dst, name = sys.argv[1:4]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name)
    sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))
