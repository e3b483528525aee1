"""``python -m include.cli.serve``: ``python -m llama_cpp.server`` with llama.cpp's CPU weight repacking off.

The same arguments and the same server as ``llama_cpp.server`` (``--help`` lists them), with two differences:

- the model is loaded by :func:`include.gguf.mmap_llama.mmap_llama_class`, so quantized weights stay in the
  mmap-ed GGUF (file-backed pages the kernel can drop) instead of being copied into anonymous memory the size of
  the model (llama.cpp repacks Q4_0/Q4_K/... weights on AVX2 CPUs, and the server has no option to stop it);
- without ``--host`` it listens on 127.0.0.1 (the server's own default is ``localhost``).

The smoke check (:func:`include.health.smoke.serve_gguf`) runs its ephemeral server through this module.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

LOOPBACK = "127.0.0.1"


def server_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` for ``llama_cpp.server``, with ``--host 127.0.0.1`` added when no host is given."""
    args = list(argv)
    if any(arg == "--host" or arg.startswith("--host=") for arg in args):
        return args
    return [*args, "--host", LOOPBACK]


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``llama_cpp.server``'s own ``main()`` with ``argv`` (default: this process's arguments).

    The server builds its model with the module attribute ``llama_cpp.Llama`` (looked up when the model is
    loaded, in ``llama_cpp.server.model.LlamaProxy``); this process only serves, so that attribute is bound to
    the no-repacking subclass before the server starts. Everything else is the server's code.
    """
    import llama_cpp
    from llama_cpp.server.__main__ import main as serve

    from include.gguf.mmap_llama import mmap_llama_class

    llama_cpp.Llama = mmap_llama_class()
    sys.argv = [sys.argv[0], *server_argv(sys.argv[1:] if argv is None else argv)]
    serve()


if __name__ == "__main__":
    main()
