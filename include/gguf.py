"""GGUF stage: convert a merged Hugging Face model to GGUF, quantize it, and check what the file really holds.

- :func:`convert_to_gguf` runs the pinned llama.cpp ``convert_hf_to_gguf.py`` as a subprocess with its
  vendored gguf-py first on ``PYTHONPATH`` (the PyPI ``gguf`` package breaks it).
- :func:`quantize_gguf` runs ``llama-quantize`` built from the same pinned sources (imatrix, per-tensor
  overrides, split output); without that binary it calls ``llama_model_quantize`` of the llama-cpp-python
  binding in a child process (``python -m include.gguf quantize SRC DST TYPE``), so native crashes stay there.
- :func:`check_quant_used` catches llama.cpp's silent fallbacks (e.g. K-quants on rows that are not
  multiples of 256 become other types, and the quantizer still exits 0).

Every output is written to a temp name in the target directory and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from include.errors import GGUFError
from include.gguf_meta import disk_preflight, estimate_weights, gguf_metadata
from include.gguf_reader import GGUFSummary, inspect_gguf, inspect_split
from include.toolchain import LlamaCppToolchain, ToolchainError

__all__ = [
    "CONVERTER_OUTTYPES",
    "GGUFSummary",
    "check_quant_used",
    "convert_to_gguf",
    "disk_preflight",
    "estimate_weights",
    "gguf_metadata",
    "inspect_gguf",
    "known_quant_types",
    "main_ggml_type",
    "quantize_gguf",
]

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")
LOG_EVERY_S = 3.0  # progress lines are logged at INFO at most this often (all lines go to DEBUG)
TAIL_LINES = 25

# Requested llama_ftype name -> the ggml type that must carry most matrix weights when it really applied.
_MAIN_TYPE_OVERRIDES = {
    "ALL_F32": "F32", "F32": "F32", "IQ3_XS": "IQ3_S", "IQ3_M": "IQ3_S", "IQ2_M": "IQ2_S", "IQ1_M": "IQ1_M",
    "MXFP4_MOE": "MXFP4",
}
_SUFFIXES = ("_XS", "_S", "_M", "_L")

# Hints for converter failures: a substring of its output -> the fix to tell the user.
_CONVERTER_HINTS = (
    ("BPE pre-tokenizer was not recognized",
     ("the tokenizer's pre-tokenizer hash is unknown to this llama.cpp: set quantize.pre_tokenizer to the "
      "llama.cpp pre-tokenizer it matches (e.g. llama-bpe, qwen2, gpt-2) or use a newer llama.cpp "
      "(settings.llama_cpp_dir)")),
    ("is not supported", "this llama.cpp does not know the model architecture: pin a newer llama.cpp"),
    ("No module named", ("a converter dependency is missing: install llama.cpp's requirements "
                         "(requirements/requirements-convert_hf_to_gguf.txt) into the converter's interpreter")),
    ("merge.backend: streaming", "the adapter cannot be merged inside the conversion (see the error above): set "
                                 "merge.backend: streaming to merge first, then convert"),
    ("MemoryError", "not enough RAM: free memory or convert on a larger worker"),
    ("No space left on device", "the disk is full: free space in the output directory"),
)


def known_quant_types() -> dict[str, int]:
    """Quantization types the pinned llama.cpp accepts: ``"Q4_K_M" -> llama_ftype`` (from LLAMA_FTYPE_*)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GGUFError("llama-cpp-python is not installed, so nothing can be quantized",
                        fix="install the pinned wheel: `python3 -m include.toolchain wheel` then pip install it") from e
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


@contextmanager
def _atomic_target(dst: Path) -> Iterator[Path]:
    """Yield a temp path next to ``dst``; rename it onto ``dst`` on success, delete it on failure."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _staged_outputs(dst: Path) -> Iterator[Path]:
    """Yield ``TMPDIR/<dst name>`` for a tool that writes one file or split shards next to it.

    On success every ``.gguf`` in the temp dir is validated by the caller and then moved next to ``dst``
    (the first shard last-but-not-least: all shards are in place before the caller reports them).
    The temp dir is removed in every case, so nothing half-written stays behind.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield work / dst.name
        for produced in sorted(work.glob("*.gguf")):
            os.chmod(produced, 0o644)
            os.replace(produced, dst.parent / produced.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _first_output(dst: Path) -> Path:
    """``dst`` itself, or the first shard ``<stem>-00001-of-N.gguf`` a split run wrote instead."""
    if dst.is_file():
        return dst
    shards = sorted(dst.parent.glob(f"{glob.escape(dst.stem)}-00001-of-*.gguf"))
    if not shards:
        raise GGUFError(f"the tool reported success but wrote no {dst.name} (nor shards of it)",
                        fix="read the tool output in the task log; check free disk space")
    return shards[0]


def run_tool(cmd: Sequence[str], *, what: str, env: dict[str, str] | None = None,
             cwd: str | Path | None = None) -> tuple[int, list[str]]:
    """Run an external llama.cpp tool with its output streamed to the task log; (returncode, last lines)."""
    return _run_streaming(cmd, env=env if env is not None else dict(os.environ), what=what, cwd=cwd)


def _run_streaming(cmd: Sequence[str], *, env: dict[str, str], what: str,
                   cwd: str | Path | None = None) -> tuple[int, list[str]]:
    """Run ``cmd``, logging its output lines (rate-limited at INFO), and return (returncode, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    last_info = 0.0
    log.info("%s: %s", what, " ".join(cmd))
    started = time.monotonic()
    # Same process group as the caller: whoever kills the task (Airflow timeout, Ctrl-C) kills the tool too.
    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:
        try:
            for raw in proc.stdout or ():
                line = raw.rstrip()
                if not line:
                    continue
                tail.append(line)
                now = time.monotonic()
                loud = any(word in line for word in ("ERROR", "Error", "WARNING", "Traceback"))
                if loud or now - last_info >= LOG_EVERY_S:
                    log.info("%s [%.0fs] %s", what, now - started, line)
                    last_info = now
                else:
                    log.debug("%s %s", what, line)
        except BaseException:
            proc.kill()  # the caller is going away (timeout, interrupt): do not leave the tool running
            raise
        returncode = proc.wait()
    log.info("%s: exit code %d after %.1fs", what, returncode, time.monotonic() - started)
    return returncode, list(tail)


def convert_to_gguf(
    merged_dir: Path,
    out_path: Path,
    *,
    toolchain: LlamaCppToolchain,
    outtype: str = "f16",
    metadata: dict[str, str] | None = None,
    python: str = sys.executable,
    pre_tokenizer: str | None = None,
    use_temp_file: bool = False,
    split_max_size: str | None = None,
    fused_adapter: Path | None = None,
) -> GGUFSummary:
    """Convert a Hugging Face model directory to one GGUF file with the pinned llama.cpp converter.

    ``metadata`` (e.g. ``{"general.name": ..., "general.version": ...}``) is passed to the converter's
    ``--metadata`` override file and ends up as GGUF ``general.*`` keys. ``pre_tokenizer`` runs the
    converter through :mod:`include.tokenizer_check`'s wrapper, which answers an unknown BPE pre-tokenizer
    hash with that name; ``use_temp_file`` is the converter's ``--use-temp-file`` (less RAM);
    ``split_max_size`` (e.g. ``"2G"``) writes shards ``<stem>-0000i-of-0000N.gguf`` (the summary's ``path``
    is the first shard, ``shards`` lists them all). ``fused_adapter``: ``merged_dir`` is the *base* model and
    this LoRA adapter is merged into it inside the converter's stream (:mod:`include.fused_convert`): the
    same GGUF as merging first, without writing the merged model.
    """
    merged_dir = Path(merged_dir)
    out_path = Path(out_path)
    if outtype not in CONVERTER_OUTTYPES:
        raise GGUFError(f"unknown converter outtype {outtype!r}", fix=f"use one of {', '.join(CONVERTER_OUTTYPES)}")
    if not (merged_dir / "config.json").is_file():
        raise GGUFError(f"{str(merged_dir)!r} has no config.json, so it is not a Hugging Face model directory",
                        fix="point at the merge stage's output directory")
    try:
        toolchain.check()
    except ToolchainError as e:
        raise GGUFError(str(e), fix="run `python3 -m include.toolchain ensure`") from e
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(toolchain.gguf_py), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if use_temp_file and split_max_size:
        raise GGUFError("the converter cannot use a temp file and split at the same time",
                        fix="set only one of quantize.use_temp_file and quantize.split_max_size")
    with tempfile.TemporaryDirectory(prefix="gguf-meta-") as meta_dir, _staged_outputs(out_path) as tmp:
        args = [str(merged_dir), "--outfile", str(tmp), "--outtype", outtype]
        if use_temp_file:
            args.append("--use-temp-file")
        if split_max_size:
            args += ["--split-max-size", split_max_size]
        if fused_adapter is not None:
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(PROJECT_ROOT)])
            env["OPENBLAS_NUM_THREADS"] = "1"  # the r-wide products are tiny: BLAS threads would only spin
            cmd = [python, "-m", "include.fused_convert", "--base", str(merged_dir), "--adapter", str(fused_adapter),
                   "--converter", str(toolchain.converter), *(["--pre", pre_tokenizer] if pre_tokenizer else []),
                   "--", *args[1:]]
        elif pre_tokenizer:
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(PROJECT_ROOT)])
            cmd = [python, "-m", "include.tokenizer_check", "convert", "--pre", pre_tokenizer,
                   "--converter", str(toolchain.converter), "--", *args]
        else:
            cmd = [python, str(toolchain.converter), *args]
        if metadata:
            meta_file = Path(meta_dir) / "metadata.json"
            meta_file.write_text(json.dumps(metadata))
            cmd += ["--metadata", str(meta_file)]
        returncode, tail = _run_streaming(cmd, env=env, what="convert_hf_to_gguf")
        if returncode != 0:
            text = "\n".join(tail)
            fix = next((hint for needle, hint in _CONVERTER_HINTS if needle in text),
                       "read the converter output above; check that the merged model is complete")
            raise GGUFError(
                f"converting {str(merged_dir)!r} to GGUF ({outtype}) failed with exit code {returncode} "
                f"({toolchain.version}); last converter output:\n{text}",
                fix=fix,
            )
        summary = inspect_split(_first_output(tmp))  # validate before it takes the final name
    return _final_summary(_first_output(out_path), summary)


def _final_summary(path: Path, staged: GGUFSummary) -> GGUFSummary:
    # The staged file was hashed when it was validated; a rename does not change bytes, so it is not read again.
    final = dataclasses.replace(inspect_split(path, with_sha256=False), sha256=staged.sha256)
    log.info("wrote %s: %d bytes, %d tensors, %.2f bits/weight, types %s", path, final.bytes, final.tensor_count,
             final.bits_per_weight, final.fractions())
    if final.tensor_count != staged.tensor_count:  # pragma: no cover - renaming cannot change the content
        raise GGUFError(f"{str(path)!r} changed while being renamed", fix="retry the task")
    return final


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
                        fix="run `python3 -m include.toolchain ensure` or set settings.llama_cpp_bin_dir")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with _atomic_target(dst) as tmp:
        cmd = [python, "-m", "include.gguf", "quantize", str(src), str(tmp), name, "--nthread", str(nthread)]
        returncode, tail = _run_streaming(cmd, env=env, what=f"quantize {name}")
        if returncode != 0:
            how = f"was killed by signal {-returncode}" if returncode < 0 else f"failed with exit code {returncode}"
            raise GGUFError(
                f"quantizing {str(src)!r} to {name} {how}; last output:\n" + "\n".join(tail),
                fix="check free disk space and memory, and that the input is an f16/bf16/f32 GGUF",
            )
        staged = inspect_gguf(tmp, with_sha256=False)
    return _final_summary(dst, staged)


def _quantize_with_binary(binary: Path, src: Path, dst: Path, name: str, *, nthread: int, imatrix: Path | None,
                          overrides: tuple[str | None, str | None], extra_kv: dict[str, str],
                          keep_split: bool) -> GGUFSummary:
    """Run ``llama-quantize`` into a temp dir next to ``dst``; validate; move into place."""
    output_type, embedding_type = overrides
    with _staged_outputs(dst) as tmp:
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
        returncode, tail = _run_streaming(cmd, env=dict(os.environ), what=f"llama-quantize {name}")
        if returncode != 0:
            how = f"was killed by signal {-returncode}" if returncode < 0 else f"failed with exit code {returncode}"
            raise GGUFError(
                f"llama-quantize {str(src)!r} to {name} {how}; last output:\n" + "\n".join(tail),
                fix="check the type names (quantize.output_tensor_type / token_embedding_type), free disk space "
                    "and memory; IQ types need an imatrix (quantize.imatrix)",
            )
        staged = inspect_split(_first_output(tmp))
    return _final_summary(_first_output(dst), staged)


def _quantize_in_process(src: str, dst: str, quant_type: str, nthread: int) -> int:
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


def main(argv: list[str] | None = None) -> int:
    """Command line: ``quantize SRC DST TYPE`` (used as the child process) and ``inspect PATH``."""
    parser = argparse.ArgumentParser(prog="python -m include.gguf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quant = sub.add_parser("quantize", help="quantize SRC to DST with llama_model_quantize")
    quant.add_argument("src")
    quant.add_argument("dst")
    quant.add_argument("quant_type")
    quant.add_argument("--nthread", type=int, default=0)
    look = sub.add_parser("inspect", help="print a GGUF summary as JSON")
    look.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        print(json.dumps(inspect_gguf(Path(args.path)).as_record(), indent=2, default=str))
        return 0
    result = _quantize_in_process(args.src, args.dst, args.quant_type.upper(), args.nthread)
    return 0 if result == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
