"""The pinned llama.cpp toolchain from the command line: ``ensure`` fetches, checks and builds it once.

``python -m include.cli.toolchain ensure [--python PY]`` prints the tools' directory and, last, the wheel path
(``scripts/bootstrap.sh`` reads it); ``source-dir``, ``wheel``, ``tools`` and ``version`` print one thing each.
Standard library only, so it runs before the project's dependencies are installed.
"""

from __future__ import annotations

import argparse
import sys

from include.gguf.toolchain import PINNED_VERSION, ensure_source, ensure_tools, ensure_wheel


def main(argv: list[str] | None = None) -> int:
    """Command line: ``ensure`` fetches, checks and builds everything and prints the wheel path."""
    parser = argparse.ArgumentParser(prog="python -m include.cli.toolchain", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["ensure", "source-dir", "wheel", "tools", "version"])
    parser.add_argument("--python", default=sys.executable, help="interpreter whose pip downloads and builds")
    args = parser.parse_args(argv)
    if args.command == "source-dir":
        print(ensure_source(args.python).source_dir)
    elif args.command == "wheel":
        print(ensure_wheel(args.python))
    elif args.command == "tools":
        ensure_source(args.python)
        print(ensure_tools())
    elif args.command == "version":
        print(PINNED_VERSION)
    else:
        ensure_source(args.python)
        print(ensure_tools())
        print(ensure_wheel(args.python))  # last line: scripts/bootstrap.sh reads the wheel path from it
    return 0



if __name__ == "__main__":
    sys.exit(main())
