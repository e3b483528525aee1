"""The child process of the convert stage: the pinned ``convert_hf_to_gguf.py`` with lora-deploy's hooks.

``python -m include.cli.convert --converter PATH [--pre NAME] [--base DIR --adapter DIR] -- CONVERTER_ARGS``

- ``--pre NAME`` answers an unknown BPE pre-tokenizer hash with ``NAME`` (``quantize.pre_tokenizer``);
- ``--base``/``--adapter`` merge the LoRA adapter into the base's tensors as the converter reads them
  (``merge.backend: fused``); every edited tensor must be merged, else exit 2.

Exit 2 on a merge error; the converter's own exit code otherwise.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from include.errors import MergeError


def main(argv: list[str] | None = None) -> int:
    """Install the requested hooks, then run the converter as ``__main__`` with ``CONVERTER_ARGS``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m include.cli.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--converter", type=Path, required=True, help="convert_hf_to_gguf.py of the toolchain")
    parser.add_argument("--pre", help="pre-tokenizer name for an unknown BPE hash (quantize.pre_tokenizer)")
    parser.add_argument("--base", type=Path, help="base model dir (fused merge)")
    parser.add_argument("--adapter", type=Path, help="LoRA adapter dir (fused merge)")
    args = parser.parse_args(argv)
    if (args.base is None) != (args.adapter is None):
        parser.error("--base and --adapter go together")
    sys.path[:0] = [str(args.converter.parent / "gguf-py"), str(args.converter.parent)]
    counters = None
    try:
        if args.adapter is not None:
            from include.gguf.fused_convert import install_merge

            counters = install_merge(args.base, args.adapter)
        if args.pre:
            from include.gguf.tokenizer import map_unknown_pre_tokenizer

            map_unknown_pre_tokenizer(args.pre)
        sys.argv = [str(args.converter), *rest]
        runpy.run_path(str(args.converter), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            raise
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    if counters is not None:
        if counters["merged"] != counters["edited"]:
            print(f"error: the fused conversion merged {counters['merged']} of {counters['edited']} edited tensors",
                  file=sys.stderr, flush=True)
            return 2
        print(f"lora-deploy: merged {counters['merged']} tensors inside the conversion", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
