"""The tiny model's GGUFs, built once per session directory and shared by the GGUF, health and operator tests."""

from __future__ import annotations

from pathlib import Path

from include.gguf.convert import convert_to_gguf
from include.gguf.quantize import quantize_gguf
from include.gguf.toolchain import pinned_toolchain
from tests.fixtures.tiny_model import make_base_model

METADATA = {"general.name": "tiny-deploy", "general.version": "v7", "general.author": "lora-deploy tests"}


def tiny_gguf(root: Path, kind: str) -> Path:
    """Build (once per directory) the tiny model's GGUFs: kind "f16", a quant type, or "narrow-f16"/"narrow-Q4_K_M".

    "narrow" is a model with hidden size 192: rows that are not multiples of 256, so K-quants fall back.
    Everything is written atomically, so an existing file is complete; tests in other modules reuse it.
    """
    narrow = kind.startswith("narrow-")
    kind = kind.removeprefix("narrow-")
    prefix = "narrow" if narrow else "tiny"
    path = root / f"{prefix}-{kind}.gguf"
    if path.is_file():
        return path
    if kind == "f16":
        base = root / f"{prefix}-base"
        if not (base / "config.json").is_file():
            make_base_model(base, hidden_size=192, intermediate_size=384) if narrow else make_base_model(base)
        convert_to_gguf(base, path, toolchain=pinned_toolchain(), outtype="f16", metadata=METADATA)
    else:
        quantize_gguf(tiny_gguf(root, f"{prefix}-f16" if narrow else "f16"), path, kind)
    return path
