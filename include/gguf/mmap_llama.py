"""Loading a GGUF with llama-cpp-python so its weights stay in the mmap-ed file (no CPU weight repacking).

Every engine path that runs a GGUF with llama.cpp on the worker's CPU uses :func:`mmap_llama_class`: the fidelity
gate in-process (:mod:`include.gguf.fidelity`) and the smoke check's server (``python -m include.cli.serve``).
"""

from __future__ import annotations

import functools
from typing import Any

from include.errors import GGUFError


@functools.cache
def mmap_llama_class() -> type:
    """``llama_cpp.Llama`` with llama.cpp's CPU weight repacking off, so the weights stay in the mmap-ed file.

    On x86 with AVX2, llama.cpp copies Q4_0/Q4_K/Q5_K/Q6_K/Q2_K/IQ4_NL/Q8_0 weights into "repack" buffers
    (anonymous memory, the size of the quantized model); ``use_extra_bufts = False`` (llama-server's
    ``--no-repack``) keeps them file-backed. llama-cpp-python 0.3.36 has no argument for it, but its
    constructor assigns ``self.model_params`` and then passes that struct to llama.cpp: the setter below turns
    the flag off on the way. F16/BF16/F32 weights are never repacked (the f16 figures are unchanged); the
    quants' perplexity moves by ~1e-5 relative (another kernel's summation order). GGUFError when the installed
    llama-cpp-python has no such flag.
    """
    from llama_cpp import Llama, llama_model_params

    from include.gguf.llama_log import route_llama_logs

    route_llama_logs()  # llama.cpp's warnings at WARNING, not as stderr (ERROR in an Airflow task)
    if "use_extra_bufts" not in {name for name, *_ in llama_model_params._fields_}:
        raise GGUFError("this llama-cpp-python has no llama_model_params.use_extra_bufts",
                        fix="install the pinned llama-cpp-python (0.3.36, see constraints.txt)")

    class MmapLlama(Llama):
        """``Llama`` whose model params always have ``use_extra_bufts`` off (see :func:`mmap_llama_class`)."""

        @property
        def model_params(self) -> Any:
            return self._mmap_model_params

        @model_params.setter
        def model_params(self, params: Any) -> None:
            params.use_extra_bufts = False
            self._mmap_model_params = params

    return MmapLlama
