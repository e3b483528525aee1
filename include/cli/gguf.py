"""GGUF files from the command line: ``inspect PATH`` prints a summary; ``quantize SRC DST TYPE`` is the child
process the quantize stage runs when no ``llama-quantize`` binary is available."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from include.gguf.quantize import quantize_in_process
from include.gguf.reader import inspect_gguf


def main(argv: list[str] | None = None) -> int:
    """Command line: ``quantize SRC DST TYPE`` (used as the child process) and ``inspect PATH``."""
    parser = argparse.ArgumentParser(prog="python -m include.cli.gguf", description=__doc__.splitlines()[0])
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
    result = quantize_in_process(args.src, args.dst, args.quant_type.upper(), args.nthread)
    return 0 if result == 0 else 3



if __name__ == "__main__":
    sys.exit(main())
