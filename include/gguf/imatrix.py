"""Importance matrix (llama.cpp ``llama-imatrix``) from a calibration text, for IQ and better K-quants.

The matrix is computed once per f16 GGUF and calibration text; the quantize tasks pass it to
``llama-quantize --imatrix``. IQ types (IQ1_*, IQ2_*, IQ3_*, IQ4_*) require it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from include.errors import GGUFError
from include.gguf.toolchain import LlamaCppToolchain
from include.gguf.tools import run_tool
from include.store.hashing import sha256_file

log = logging.getLogger(__name__)

# A small built-in calibration text (written for this project): plain prose, lists, numbers, code, dialogue.
BUILTIN_CALIBRATION = """\
The deployment pipeline takes a trained adapter, merges it into the base model and converts the result.
Each stage writes its output to a temporary directory first and renames it into place when it is complete.
A retry therefore resumes from the last finished stage instead of starting again from the beginning.

Here is a short list of things to check before a release:
1. The merged weights load and produce sensible text.
2. The quantized files use the requested types for most of their weights.
3. The tokenizer gives the same tokens in both libraries for ordinary and unusual text.
4. The model card names the base model, the adapter version and the evaluation figures.

User: How many apples are left if I buy twelve and eat three of them?
Assistant: You would have nine apples left, because twelve minus three is nine.
User: And if I then give away half, rounding down?
Assistant: Half of nine is four and a half, so rounding down you give away four and keep five.

def average(values):
    total = 0
    for value in values:
        total += value
    return total / len(values) if values else 0.0

The weather today is mild, with a light wind from the west and a few clouds in the afternoon.
In the evening the temperature drops to eleven degrees, and rain is expected after midnight.
Numbers such as 3.14159, 2026, 1,000,000 and 0x1F appear in technical writing as often as words do.
Short sentences help. Longer ones, with commas, clauses and the occasional aside, help too.
"""

IQ_PREFIX = "IQ"


def needs_imatrix(quant: str) -> bool:
    """True for the types that must have an importance matrix (the IQ family)."""
    return quant.upper().startswith(IQ_PREFIX)


def calibration_text(imatrix_settings: dict[str, Any] | None) -> tuple[str, str] | None:
    """``(text, source)`` from ``quantize.imatrix`` settings, or None when no calibration is configured."""
    settings = imatrix_settings or {}
    path = settings.get("calibration_file")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8"), str(path)
        except OSError as e:
            raise GGUFError(f"cannot read quantize.imatrix.calibration_file {str(path)!r}: {e}",
                            fix="point quantize.imatrix.calibration_file at a readable UTF-8 text file") from e
    if settings.get("use_builtin_text"):
        return BUILTIN_CALIBRATION, "builtin"
    return None


def compute_imatrix(toolchain: LlamaCppToolchain, f16_path: Path, text: str, out_path: Path, *,
                    ctx_size: int = 128, chunks: int = 8, threads: int = 1) -> Path:
    """Run ``llama-imatrix`` on ``f16_path`` over ``text``; write ``out_path`` (GGUF imatrix) atomically.

    One thread by default so the sums are added in a fixed order and reruns give the same bytes.
    """
    binary = toolchain.tool("llama-imatrix")
    if binary is None:
        raise GGUFError(f"llama-imatrix is not available in {toolchain.version} (looked in {toolchain.bin_dir})",
                        fix="run `python3 -m include.cli.toolchain ensure` (builds it from the pinned sources), or "
                            "set settings.llama_cpp_bin_dir to a dir holding llama-imatrix")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".imatrix-", dir=out_path.parent) as work:
        # Relative names: llama-imatrix records the dataset name in its output, so no temp path may leak in.
        Path(work, "calibration.txt").write_text(text, encoding="utf-8")
        cmd = [str(binary), "-m", str(Path(f16_path).resolve()), "-f", "calibration.txt", "-o", "imatrix.gguf",
               "-c", str(ctx_size), "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx_size),
               "--no-ppl"]
        returncode, tail = run_tool(cmd, what="llama-imatrix", cwd=work)
        produced = Path(work, "imatrix.gguf")
        if returncode != 0 or not produced.is_file():
            raise GGUFError(f"llama-imatrix failed (exit code {returncode}); last output:\n" + "\n".join(tail),
                            fix="the calibration text may be too short for the context size: give at least "
                                f"{2 * ctx_size} tokens of text, or lower quantize.imatrix.ctx_size")
        os.chmod(produced, 0o644)
        shutil.move(str(produced), out_path)
    log.info("imatrix %s: %d bytes, sha256 %s", out_path, out_path.stat().st_size, sha256_file(out_path))
    return out_path
