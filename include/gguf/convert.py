"""Convert a Hugging Face model directory to GGUF with the pinned llama.cpp ``convert_hf_to_gguf.py``.

The converter runs as a subprocess with its vendored gguf-py first on ``PYTHONPATH`` (the PyPI ``gguf``
package breaks it). With an unknown BPE pre-tokenizer mapped by the config, or a LoRA adapter fused into the
conversion, it runs through :mod:`include.cli.convert`, which installs those hooks first.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from include.errors import GGUFError, ToolchainError
from include.gguf.reader import GGUFSummary, inspect_split
from include.gguf.toolchain import LlamaCppToolchain
from include.gguf.tools import PROJECT_ROOT, final_summary, first_output, run_streaming, staged_outputs

log = logging.getLogger(__name__)

CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")

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
    converter through :mod:`include.gguf.tokenizer`'s wrapper, which answers an unknown BPE pre-tokenizer
    hash with that name; ``use_temp_file`` is the converter's ``--use-temp-file`` (less RAM);
    ``split_max_size`` (e.g. ``"2G"``) writes shards ``<stem>-0000i-of-0000N.gguf`` (the summary's ``path``
    is the first shard, ``shards`` lists them all). ``fused_adapter``: ``merged_dir`` is the *base* model and
    this LoRA adapter is merged into it inside the converter's stream (:mod:`include.gguf.fused_convert`): the
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
        raise GGUFError(str(e), fix="run `python3 -m include.cli.toolchain ensure`") from e
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(toolchain.gguf_py), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if use_temp_file and split_max_size:
        raise GGUFError("the converter cannot use a temp file and split at the same time",
                        fix="set only one of quantize.use_temp_file and quantize.split_max_size")
    with tempfile.TemporaryDirectory(prefix="gguf-meta-") as meta_dir, staged_outputs(out_path) as tmp:
        args = [str(merged_dir), "--outfile", str(tmp), "--outtype", outtype]
        if use_temp_file:
            args.append("--use-temp-file")
        if split_max_size:
            args += ["--split-max-size", split_max_size]
        if fused_adapter is not None or pre_tokenizer:
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(PROJECT_ROOT)])
            if fused_adapter is not None:
                env["OPENBLAS_NUM_THREADS"] = "1"  # the r-wide products are tiny: BLAS threads would only spin
            cmd = [python, "-m", "include.cli.convert", "--converter", str(toolchain.converter),
                   *(["--pre", pre_tokenizer] if pre_tokenizer else []),
                   *(["--base", str(merged_dir), "--adapter", str(fused_adapter)] if fused_adapter else []),
                   "--", *args]
        else:
            cmd = [python, str(toolchain.converter), *args]
        if metadata:
            meta_file = Path(meta_dir) / "metadata.json"
            meta_file.write_text(json.dumps(metadata))
            cmd += ["--metadata", str(meta_file)]
        returncode, tail = run_streaming(cmd, env=env, what="convert_hf_to_gguf")
        if returncode != 0:
            text = "\n".join(tail)
            fix = next((hint for needle, hint in _CONVERTER_HINTS if needle in text),
                       "read the converter output above; check that the merged model is complete")
            raise GGUFError(
                f"converting {str(merged_dir)!r} to GGUF ({outtype}) failed with exit code {returncode} "
                f"({toolchain.version}); last converter output:\n{text}",
                fix=fix,
            )
        summary = inspect_split(first_output(tmp))  # validate before it takes the final name
    return final_summary(first_output(out_path), summary)
