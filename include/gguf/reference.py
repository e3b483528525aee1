"""The fidelity gate's Hugging Face reference, computed one decoder layer at a time from the safetensors.

:func:`streamed_logits` gives the float32 logits that ``AutoModelForCausalLM.from_pretrained(dir,
dtype=float32)(ids).logits`` gives, without ever holding the model:

- the model is built on the ``meta`` device (shapes only, no memory); its rotary embedding, whose
  non-persistent ``inv_freq`` buffer has no value there, is rebuilt on the CPU by its own constructor;
- only the embedding rows of the prompts' token ids are read (by offset, not the whole matrix) and fed to
  the decoder as ``inputs_embeds``;
- a forward pre-hook on each decoder layer loads that layer's tensors (as float32) just before it runs, and
  a forward hook sends it back to ``meta`` right after, so transformers' own attention, rotary and mask code
  computes the math with one layer in memory;
- the output head (``lm_head.weight``, or the embedding matrix when the embeddings are tied) is applied in
  chunks of ``HEAD_ROWS`` vocabulary rows.

With a fused adapter (merge.backend fused: the directory is the base model), every tensor the adapter edits
is its merged value (:mod:`include.merge.fused`, what the fused conversion wrote), computed when its layer
is loaded; edited embedding rows and head chunks are merged row by row.

Memory: one decoder layer in float32, the head chunk, the tensor being read, the activations of the prompts
(a few tokens by the hidden size) and the logits (tokens by vocabulary), plus torch itself. Architectures
whose layout has not been verified against the full model raise :class:`GGUFError` naming the fix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from include.errors import GGUFError

log = logging.getLogger(__name__)
PROGRESS_S = 15.0  # seconds between progress lines of the layer-by-layer forward pass

# Verified against the full-model logits (tests/include/gguf/test_reference.py): the decoder takes
# ``inputs_embeds`` as is (no embedding scale), its parameters are the checkpoint's names.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
HEAD_ROWS = 8192
EMBED_KEY, NORM_PREFIX, HEAD_KEY = "model.embed_tokens.weight", "model.norm.", "lm_head.weight"
_DISABLE_FIX = ("set fidelity.enabled: false for this model (the gate cannot compute its reference); the "
                "streamed reference supports " + ", ".join(SUPPORTED_ARCHITECTURES))


class _Weights:
    """The checkpoint's tensors as torch tensors, read by offset; edited ones merged on the fly (fused)."""

    def __init__(self, model_dir: Path, fused_adapter: Path | None) -> None:
        from include.merge.fused import check_fusable
        from include.merge.safetensors_io import list_model_tensors

        self.model_dir = model_dir
        if fused_adapter is not None:
            adapter, self.tensors = check_fusable(model_dir, Path(fused_adapter))
            self.edits = dict(adapter.edits)
        else:
            self.tensors, self.edits = list_model_tensors(model_dir), {}
        self._row_readers: dict[str, Callable[[int, int], Any]] = {}

    def info(self, key: str, shape: tuple[int, ...] | None = None) -> Any:
        """The TensorInfo of ``key``; GGUFError when it is missing or (``shape``) has another shape."""
        info = self.tensors.get(key)
        if info is None:
            raise GGUFError(f"the model {str(self.model_dir)!r} has no tensor {key!r}, which the fidelity gate's "
                            "layer-streamed reference needs", fix=_DISABLE_FIX)
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise GGUFError(f"tensor {key!r} of {str(self.model_dir)!r} has shape {list(info.shape)}, its "
                            f"config.json says {list(shape)}", fix="the checkpoint and its config.json disagree: "
                            "download or write the model again")
        return info

    def load_into(self, key: str, target: Any) -> None:
        """Copy tensor ``key`` (merged when edited) into the float32 tensor ``target`` of the same shape."""
        from include.merge.fused import merged_tensor
        from include.merge.safetensors_io import read_tensor

        info = self.info(key, tuple(target.shape))
        edit = self.edits.get(key)
        target.copy_(merged_tensor(info, edit) if edit is not None else _to_torch(read_tensor(info)))

    def rows(self, key: str, start: int, stop: int) -> Any:
        """Rows ``start:stop`` of the 2-D tensor ``key`` (merged when edited), as float32."""
        info = self.info(key)
        edit = self.edits.get(key)
        if edit is None:
            return _to_torch(_read_rows(info, start, stop)).float()
        if key not in self._row_readers:
            from include.merge.fused import merged_rows

            self._row_readers[key] = merged_rows(info, edit)
        return self._row_readers[key](start, stop).float()

    def gather(self, key: str, ids: Sequence[int]) -> Any:
        """The rows ``ids`` of tensor ``key`` (embedding lookup), float32, shape ``(len(ids), cols)``."""
        import torch

        unique = sorted(set(ids))
        found = {i: self.rows(key, i, i + 1)[0] for i in unique}
        return torch.stack([found[i] for i in ids])


def _to_torch(array: np.ndarray) -> Any:
    """A torch view of a numpy F32/F16/BF16 array (bfloat16 through its 16-bit pattern)."""
    import torch

    if array.dtype.itemsize == 2 and array.dtype != np.float16:  # ml_dtypes.bfloat16
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _read_rows(info: Any, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a 2-D F32/F16/BF16 tensor, read at their offset (no mmap, no whole tensor)."""
    from include.merge.safetensors_io import numpy_dtype

    dtype = numpy_dtype(info.dtype, name=info.name)
    cols = int(np.prod(info.shape[1:], dtype=np.int64))
    raw = np.empty((stop - start) * cols * dtype.itemsize, dtype=np.uint8)
    with info.file.open("rb", buffering=0) as handle:
        handle.seek(info.offset + start * cols * dtype.itemsize)
        if handle.readinto(memoryview(raw)) != raw.size:
            raise GGUFError(f"{str(info.file)!r} ends inside tensor {info.name!r}",
                            fix="the file is truncated: write or download the model again")
    return raw.view(dtype).reshape(stop - start, cols)


def _skeleton(model_dir: Path) -> Any:
    """The model on the meta device, float32, with its rotary embedding rebuilt on the CPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"the fidelity gate cannot compute the reference logits of {str(model_dir)!r}: "
                        f"architecture {architecture!r} is not supported by the layer-streamed reference "
                        "(the gate never loads a whole model)", fix=_DISABLE_FIX)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    decoder = model.model
    decoder.rotary_emb = type(decoder.rotary_emb)(config=model.config)  # built outside meta: real inv_freq
    managed = (EMBED_KEY, HEAD_KEY, NORM_PREFIX, "model.layers.")
    stray = [name for name, _ in model.named_parameters() if not name.startswith(managed)]
    stray += [name for name, b in model.named_buffers() if b.is_meta]
    if stray:
        raise GGUFError(f"architecture {architecture!r} of {str(model_dir)!r} has tensors the layer-streamed "
                        f"reference does not load: {stray[:4]}", fix=_DISABLE_FIX)
    return model


def _materialise(module: Any, prefix: str, weights: _Weights) -> None:
    """Give ``module`` (on meta) CPU float32 storage and fill it from the checkpoint (keys ``prefix`` + name)."""
    import torch

    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in module.named_parameters():
            weights.load_into(prefix + name, param)


def _layer_hooks(decoder: Any, weights: _Weights) -> list[Any]:
    """Forward hooks that load decoder layer ``i`` just before it runs and free it right after.

    At most every PROGRESS_S seconds the task log gets a progress line (a 70B model's 80 layers take minutes).
    """
    handles = []
    started = last = time.monotonic()
    total = len(decoder.layers)
    for index, layer in enumerate(decoder.layers):
        prefix = f"model.layers.{index}."

        def load(module: Any, _args: Any, prefix: str = prefix) -> None:
            _materialise(module, prefix, weights)

        def free(module: Any, _args: Any, _output: Any, done: int = index + 1) -> None:
            nonlocal last
            module.to("meta")
            now = time.monotonic()
            if now - last >= PROGRESS_S and done < total:
                last = now
                log.info("reference logits: %d of %d layers in %.0f s", done, total, now - started)

        handles += [layer.register_forward_pre_hook(load), layer.register_forward_hook(free)]
    return handles


def streamed_logits(model_dir: Path, token_ids: Sequence[Sequence[int]], fused_adapter: Path | None = None
                    ) -> list[np.ndarray]:
    """Float64 logits ``(len(ids), vocab)`` of each token-id sequence, computed one decoder layer at a time.

    The sequences run as one right-padded batch without an attention mask: under the causal mask a real
    token attends only to the tokens before it, never to the padding after it, so each sequence's logits
    are those of the sequence alone. ``fused_adapter``: ``model_dir`` is the base and this adapter's edits
    are merged tensor by tensor as they are loaded (merge.backend fused).
    """
    import torch

    model_dir = Path(model_dir)
    lengths = [len(ids) for ids in token_ids]
    if not token_ids or min(lengths) == 0:
        raise GGUFError("no tokens to compute reference logits for", fix="use non-empty fidelity.prompts")
    model = _skeleton(model_dir)
    weights = _Weights(model_dir, fused_adapter)
    config = model.config
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head_key = EMBED_KEY if tied else HEAD_KEY
    weights.info(EMBED_KEY, (vocab, hidden))
    weights.info(head_key, (vocab, hidden))
    bad = [t for ids in token_ids for t in ids if not 0 <= t < vocab]
    if bad:
        raise GGUFError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1}) of {str(model_dir)!r}",
                        fix="the tokenizer does not belong to this model: use the model's own tokenizer files")
    width = max(lengths)
    flat = [t for ids in token_ids for t in ids]
    rows = weights.gather(EMBED_KEY, flat)
    embeds = torch.zeros(len(token_ids), width, hidden, dtype=torch.float32)
    offset = 0
    for index, length in enumerate(lengths):
        embeds[index, :length] = rows[offset:offset + length]
        offset += length
    del rows
    _materialise(model.model.norm, NORM_PREFIX, weights)
    handles = _layer_hooks(model.model, weights)
    try:
        with torch.inference_mode():
            states = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            del embeds
            states = torch.cat([states[index, :length] for index, length in enumerate(lengths)])
            logits = torch.empty(states.shape[0], vocab, dtype=torch.float32)
            for start in range(0, vocab, HEAD_ROWS):
                stop = min(start + HEAD_ROWS, vocab)
                logits[:, start:stop] = torch.nn.functional.linear(states, weights.rows(head_key, start, stop))
    finally:
        for handle in handles:
            handle.remove()
    log.info("reference logits of %s: %d sequences, %d tokens, %d layers streamed%s", model_dir.name,
             len(token_ids), len(flat), len(model.model.layers), " (fused adapter)" if fused_adapter else "")
    return [part.to(torch.float64).numpy() for part in torch.split(logits, lengths)]
