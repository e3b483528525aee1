"""Quantize a GGUF and check what the file really holds.

- :func:`quantize_gguf` runs ``llama-quantize`` built from the pinned sources (imatrix, per-tensor
  overrides, split output); without that binary it calls ``llama_model_quantize`` of the llama-cpp-python
  binding in a child process (``python -m include.cli.gguf quantize SRC DST TYPE``), so native crashes stay there.
- :func:`check_quant_used` catches llama.cpp's silent fallbacks (e.g. K-quants on rows that are not
  multiples of 256 become other types, and the quantizer still exits 0).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from include.errors import GGUFError
from include.gguf.reader import GGUFSummary, inspect_gguf, inspect_split
from include.gguf.toolchain import LlamaCppToolchain
from include.gguf.tools import PROJECT_ROOT, atomic_target, final_summary, first_output, run_streaming, staged_outputs

log = logging.getLogger(__name__)

# Requested llama_ftype name -> the ggml type that must carry most matrix weights when it really applied.
_MAIN_TYPE_OVERRIDES = {
    "ALL_F32": "F32", "F32": "F32", "IQ3_XS": "IQ3_S", "IQ3_M": "IQ3_S", "IQ2_M": "IQ2_S", "IQ1_M": "IQ1_M",
    "MXFP4_MOE": "MXFP4",
}
_SUFFIXES = ("_XS", "_S", "_M", "_L")


def known_quant_types() -> dict[str, int]:
    """Quantization types the pinned llama.cpp accepts: ``"Q4_K_M" -> llama_ftype`` (from LLAMA_FTYPE_*)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFError("llama-cpp-python is not installed, so nothing can be quantized",
                        fix="install the pinned wheel: `python3 -m include.cli.toolchain wheel` then pip install "
                            "it") from e
    types: dict[str, int] = {}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            types[attr.removeprefix("LLAMA_FTYPE_MOSTLY_")] = int(getattr(llama_cpp, attr))
    if hasattr(llama_cpp, "LLAMA_FTYPE_ALL_F32"):
        types["F32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    return dict(sorted(types.items(), key=lambda item: item[1]))


def main_ggml_type(quant_type: str) -> str:
    """The ggml tensor type a requested quantization mainly produces (``Q4_K_M`` -> ``Q4_K``)."""
    name = quant_type.upper()
    if name in _MAIN_TYPE_OVERRIDES:
        return _MAIN_TYPE_OVERRIDES[name]
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and not name.startswith("IQ") and "_K" in name:
            return name.removesuffix(suffix)
    return name


def check_quant_used(summary: GGUFSummary, quant_type: str, *, min_fraction: float = 0.5,
                     on_fallback: str = "fail") -> float:
    """GGUFError unless ``quant_type``'s main ggml type holds >= ``min_fraction`` of the 2-D weights.

    llama.cpp falls back silently (and exits 0) when a type cannot be applied, e.g. K-quants on rows
    that are not multiples of 256; this catches such a file before it is published. With
    ``on_fallback="warn"`` the same message is logged as a warning instead. Returns the fraction.
    """
    main = main_ggml_type(quant_type)
    counts = summary.matrix_weights_by_type
    total = sum(counts.values())
    if total == 0:
        raise GGUFError(f"{summary.path!r} has no 2-D weight tensors to check against {quant_type!r}",
                        fix="the file is empty or corrupt; re-create it")
    fraction = counts.get(main, 0) / total
    if fraction < min_fraction:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in summary.fractions().items())
        error = GGUFError(
            f"{summary.path!r} was requested as {quant_type!r} but only {fraction:.1%} of its {total} matrix weights "
            f"are {main} (need >= {min_fraction:.0%}); types used: {shares}",
            fix="llama.cpp fell back to other types: K-quants need tensor rows that are multiples of 256, "
                "so pick a non-K type (Q8_0, Q5_0, Q4_0) for this model or check the requested type; "
                "quantize.on_fallback: warn keeps such files with a warning",
        )
        if on_fallback != "warn":
            raise error
        log.warning("quantize.on_fallback=warn, keeping the file: %s", error)
        return fraction
    log.info("%s: %s covers %.1f%% of matrix weights (%.2f bits/weight)", summary.path, main, fraction * 100,
             summary.bits_per_weight)
    return fraction


def quantize_gguf(src: Path, dst: Path, quant_type: str, *, python: str = sys.executable,
                  nthread: int = 0, toolchain: LlamaCppToolchain | None = None, imatrix: Path | None = None,
                  output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                  extra_kv: dict[str, str] | None = None, keep_split: bool = False) -> GGUFSummary:
    """Quantize a GGUF (normally f16/bf16/f32) to ``quant_type`` (e.g. ``Q4_K_M``) in a child process.

    With a ``toolchain`` that has a ``llama-quantize`` binary (built from the pinned sources, or the
    user's), that binary runs, with ``--imatrix`` and the per-tensor overrides; otherwise the
    llama-cpp-python binding's ``llama_model_quantize`` does (no imatrix there). ``extra_kv`` (string
    values) are written into the output's metadata with ``--override-kv`` (binary only). A split input
    (its first shard) is quantized shard by shard with ``keep_split`` (``--keep-split``).
    """
    src = Path(src)
    dst = Path(dst)
    name = quant_type.upper()
    known = known_quant_types()
    if name not in known:
        raise GGUFError(f"unknown quantization type {quant_type!r}", fix=f"use one of {', '.join(known)}")
    if not src.is_file():
        raise GGUFError(f"quantizer input {str(src)!r} does not exist", fix="run the conversion stage first")
    inspect_gguf(src, with_sha256=False)  # a clear error for a non-GGUF input instead of a native one
    binary = toolchain.tool("llama-quantize") if toolchain else None
    if binary is not None:
        return _quantize_with_binary(binary, src, dst, name, nthread=nthread, imatrix=imatrix,
                                     overrides=(output_tensor_type, token_embedding_type), extra_kv=extra_kv or {},
                                     keep_split=keep_split)
    if imatrix is not None or output_tensor_type or token_embedding_type or keep_split:
        raise GGUFError(f"quantizing to {name} with an imatrix, tensor-type overrides or --keep-split needs "
                        "llama-quantize, "
                        f"which {toolchain.version if toolchain else 'this toolchain'} does not have",
                        fix="run `python3 -m include.cli.toolchain ensure` or set settings.llama_cpp_bin_dir")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with atomic_target(dst) as tmp:
        cmd = [python, "-m", "include.cli.gguf", "quantize", str(src), str(tmp), name, "--nthread", str(nthread)]
        returncode, tail = run_streaming(cmd, env=env, what=f"quantize {name}")
        if returncode != 0:
            how = f"was killed by signal {-returncode}" if returncode < 0 else f"failed with exit code {returncode}"
            raise GGUFError(
                f"quantizing {str(src)!r} to {name} {how}; last output:\n" + "\n".join(tail),
                fix="check free disk space and memory, and that the input is an f16/bf16/f32 GGUF",
            )
        staged = inspect_gguf(tmp, with_sha256=False)
    return final_summary(dst, staged)


def _quantize_with_binary(binary: Path, src: Path, dst: Path, name: str, *, nthread: int, imatrix: Path | None,
                          overrides: tuple[str | None, str | None], extra_kv: dict[str, str],
                          keep_split: bool) -> GGUFSummary:
    """Run ``llama-quantize`` into a temp dir next to ``dst``; validate; move into place."""
    output_type, embedding_type = overrides
    with staged_outputs(dst) as tmp:
        cmd = [str(binary), *(["--keep-split"] if keep_split else [])]
        if imatrix is not None:
            cmd += ["--imatrix", str(imatrix)]
        if output_type:
            cmd += ["--output-tensor-type", output_type.lower()]
        if embedding_type:
            cmd += ["--token-embedding-type", embedding_type.lower()]
        for key, value in sorted(extra_kv.items()):
            cmd += ["--override-kv", f"{key}=str:{value[:127]}"]
        cmd += [str(src), str(tmp), name]
        if nthread > 0:
            cmd.append(str(nthread))
        returncode, tail = run_streaming(cmd, env=dict(os.environ), what=f"llama-quantize {name}")
        if returncode != 0:
            how = f"was killed by signal {-returncode}" if returncode < 0 else f"failed with exit code {returncode}"
            raise GGUFError(
                f"llama-quantize {str(src)!r} to {name} {how}; last output:\n" + "\n".join(tail),
                fix="check the type names (quantize.output_tensor_type / token_embedding_type), free disk space "
                    "and memory; IQ types need an imatrix (quantize.imatrix)",
            )
        staged = inspect_split(first_output(tmp))
    return final_summary(first_output(dst), staged)


def quantize_in_process(src: str, dst: str, quant_type: str, nthread: int) -> int:
    """Child-process body: call llama_model_quantize; return its result code."""
    import ctypes

    import llama_cpp

    ftype = known_quant_types()[quant_type]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    started = time.monotonic()
    result = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    print(f"llama_model_quantize -> {result} ({quant_type}, ftype {ftype}) in {time.monotonic() - started:.1f}s",
          flush=True)
    return int(result)
