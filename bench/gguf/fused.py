"""Fused merge + conversion for the benchmark: adapter + base -> f16 GGUF without writing the merged model.

    python bench/gguf/fused.py --base BASE_DIR --adapter ADAPTER_DIR [--converter PATH] -- CONVERTER_ARGS...

A thin front of :mod:`include.cli.convert` (what the deploy DAG runs with ``merge.backend: fused``): the
converter defaults to the pinned toolchain's, and OpenBLAS stays on one thread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: see include.gguf.fused_convert
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    """Run the engine's fused conversion, with the pinned converter unless ``--converter`` is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours = argv[:argv.index("--")] if "--" in argv else argv
    if "--converter" not in ours:
        from include.gguf.toolchain import pinned_toolchain

        argv[:0] = ["--converter", str(pinned_toolchain().converter)]
    from include.cli.convert import main as convert_main

    if "--" not in argv:
        argv.append("--")
    cut = argv.index("--")
    argv[cut + 1:cut + 1] = [argv[argv.index("--base") + 1]]  # the converter's model dir is the base
    return convert_main(argv)


if __name__ == "__main__":
    sys.exit(main())
