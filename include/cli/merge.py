"""Merge a LoRA adapter into its base model outside Airflow (any backend); prints the result record as JSON.

``lora-deploy-merge --base DIR|ORG/NAME --adapter DIR --out DIR [--backend streaming|peft|unsloth|auto]
[--dtype auto|float32|float16|bfloat16] [--max-shard-size 2GiB]`` (also ``python -m include.merge``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from include.errors import LoraDeployError
from include.merge.backends import merge_model
from include.merge.base_model import resolve_base_model
from include.merge.streaming import DTYPE_CHOICES


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    try:
        return int(float(number) * units[stripped[len(number):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use bytes or e.g. 512MB, 2GiB") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints the result record as JSON. Exit 2 on a merge error."""
    parser = argparse.ArgumentParser(prog="lora-deploy-merge", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model dir (safetensors) or a repo id in the HF cache")
    parser.add_argument("--adapter", required=True, type=Path, help="peft LoRA adapter dir")
    parser.add_argument("--out", required=True, type=Path, help="output dir (must not exist or be empty)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    parser.add_argument("--backend", default="streaming", choices=("streaming", "peft", "unsloth", "auto"))
    parser.add_argument("--expected-base", default=None, help="repo id or path the adapter must be trained on")
    parser.add_argument("--max-shard-size", default=2 * 1024**3, type=_size, help="e.g. 2GiB (default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = merge_model(resolve_base_model(args.base), args.adapter, args.out, backend=args.backend,
                             dtype=args.dtype, expected_base=args.expected_base, max_shard_bytes=args.max_shard_size)
    except LoraDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0



if __name__ == "__main__":
    sys.exit(main())
