"""The sizes the estimates start from, read from headers only (no tensor data): a model's safetensors and
config.json, or a GGUF's header.

What counts as a *layer* (the issue's bound, "2 GB + 1.5 x the largest layer in float32"): a decoder block (every
tensor under ``<...>.layers.<i>.``), the token embedding, and the output head (``lm_head``; with tied embeddings
the head is the embedding matrix itself). :attr:`ModelShape.largest_layer` is the largest of them in float32.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK = re.compile(r"^(?P<block>.*\.layers\.\d+)\.")
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
HEAD_NAMES = ("lm_head.weight", "output.weight")


@dataclass(frozen=True)
class ModelShape:
    """A Hugging Face model directory's sizes, from its safetensors headers and config.json."""

    parameters: int
    stored_bytes: int  # the safetensors' tensor bytes
    matrix_elements: int  # elements of 2-D+ tensors (quantized in a GGUF)
    vector_elements: int  # elements of 1-D tensors (norms, biases: float32 in a GGUF)
    largest_tensor: tuple[str, int]  # (name, elements)
    largest_block: tuple[str, int]  # (decoder block prefix, elements)
    largest_block_tensor: int  # elements of the largest tensor inside a decoder block
    block_rows_cols: int  # sum over the decoder blocks' 2-D tensors of rows + columns (a LoRA's A and B per rank)
    embedding_elements: int
    head_elements: int  # 0 when the head is tied to the embedding
    vocab: int
    hidden: int
    layers: int
    kv_dim: int  # per layer: key/value heads x head size
    cols_total: int  # sum over 2-D tensors of their row length (an importance matrix's size / 4)
    matrices: int  # number of 2-D tensors

    @property
    def head_tied(self) -> bool:
        """The output head is the embedding matrix."""
        return self.head_elements == 0

    @property
    def largest_layer(self) -> tuple[str, int]:
        """``(what, float32 bytes)`` of the largest layer: a decoder block, the embedding or the output head."""
        block_name, block = self.largest_block
        candidates = [(f"decoder block {block_name}", block * 4), ("token embedding", self.embedding_elements * 4),
                      ("output head", self.head_elements * 4)]
        return max(candidates, key=lambda c: c[1])

    def as_record(self) -> dict[str, Any]:
        """The figures the plan record shows."""
        what, size = self.largest_layer
        return {"parameters": self.parameters, "stored_bytes": self.stored_bytes,
                "largest_tensor": {"name": self.largest_tensor[0], "elements": self.largest_tensor[1]},
                "largest_layer": {"name": what, "fp32_bytes": size}, "vocab": self.vocab, "hidden": self.hidden,
                "layers": self.layers}


def _config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config.get("text_config", config) if isinstance(config, dict) else {}


def model_shape(model_dir: Path) -> ModelShape:
    """The :class:`ModelShape` of ``model_dir`` (safetensors + index, config.json): headers only."""
    from include.merge.safetensors_io import list_model_tensors

    tensors = list_model_tensors(Path(model_dir))
    config = _config(model_dir)
    blocks: dict[str, int] = {}
    largest = ("", 0)
    embedding = head = cols = matrices = matrix = vector = in_block = rows_cols = 0
    for name, info in tensors.items():
        count = math.prod(info.shape)
        largest = max(largest, (name, count), key=lambda t: t[1])
        if len(info.shape) >= 2:
            matrix += count
            matrices += 1
            cols += math.prod(info.shape[1:])
        else:
            vector += count
        found = BLOCK.match(name)
        if found:
            blocks[found["block"]] = blocks.get(found["block"], 0) + count
            in_block = max(in_block, count)
            rows_cols += sum(info.shape[:2]) if len(info.shape) == 2 else 0
        elif name.endswith(EMBEDDING_NAMES):
            embedding = max(embedding, count)
        elif name.endswith(HEAD_NAMES):
            head = max(head, count)
    block = max(blocks.items(), key=lambda b: b[1]) if blocks else ("", 0)
    hidden = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or (hidden // heads if hidden else 0))
    return ModelShape(
        parameters=matrix + vector, stored_bytes=sum(t.nbytes for t in tensors.values()), matrix_elements=matrix,
        vector_elements=vector, largest_tensor=largest, largest_block=block, largest_block_tensor=in_block,
        block_rows_cols=rows_cols, embedding_elements=embedding, head_elements=head,
        vocab=int(config.get("vocab_size") or 0), hidden=hidden,
        layers=int(config.get("num_hidden_layers") or len(blocks)),
        kv_dim=int(config.get("num_key_value_heads") or heads) * head_dim, cols_total=cols, matrices=matrices)


@dataclass(frozen=True)
class GGUFShape:
    """A GGUF's sizes, from its header (all shards of a split file)."""

    file_bytes: int
    largest_tensor: tuple[str, int]  # (name, elements)
    largest_tensor_bytes: int  # its stored bytes
    vocab: int
    hidden: int
    layers: int
    kv_dim: int
    train_context: int
    bytes_by_type: dict[str, int]  # tensor-data bytes per ggml type


def gguf_shape(path: Path) -> GGUFShape:
    """The :class:`GGUFShape` of a GGUF file (its first shard for a split one): header only."""
    from include.gguf.reader import inspect_split

    summary = inspect_split(Path(path), with_sha256=False)
    meta = summary.metadata
    arch = str(meta.get("general.architecture") or "")

    def number(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int | float) else default

    largest = max(summary.tensors, key=lambda t: t.elements)
    embed = next((t for t in summary.tensors if t.name == "token_embd.weight"), None)
    hidden = number("embedding_length")
    heads = number("attention.head_count", 1) or 1
    head_dim = number("attention.key_length", hidden // heads if hidden else 0)
    by_type: dict[str, int] = {}
    for tensor in summary.tensors:
        by_type[tensor.ggml_type] = by_type.get(tensor.ggml_type, 0) + (tensor.nbytes or 0)
    return GGUFShape(file_bytes=summary.bytes, largest_tensor=(largest.name, largest.elements),
                     largest_tensor_bytes=largest.nbytes or 0, vocab=embed.dims[1] if embed and len(embed.dims) > 1
                     else 0, hidden=hidden, layers=number("block_count"),
                     kv_dim=number("attention.head_count_kv", heads) * head_dim,
                     train_context=number("context_length"), bytes_by_type=by_type)
