"""llama.cpp: the pinned toolchain, conversion (plain or fused), quantization, tokenizer checks, fidelity."""
