"""Tiny, deterministic models generated offline: a Llama base model and a peft LoRA adapter for it.

The Hugging Face Hub is not reachable from tests (nor needed): :func:`make_base_model` builds a small
Llama-architecture checkpoint with seeded random weights and a SentencePiece BPE tokenizer trained
locally, in the layout ``transformers`` and llama.cpp's ``convert_hf_to_gguf.py`` accept.
:func:`make_lora_adapter` builds a peft LoRA adapter for it with non-zero ``lora_B`` (peft initialises
B to zero, which would make a merge a no-op). Same arguments give the same tensors.

The dimensions are multiples of 256 where llama.cpp's K-quants need it (hidden 256, intermediate 512),
so Q4_K_M/Q5_K_M really use K-quant types instead of silently falling back.

Heavy libraries (torch, transformers, peft, sentencepiece) are imported inside the functions only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from include.errors import LoraDeployError

log = logging.getLogger(__name__)

Arch = Literal["llama", "qwen2", "mistral", "gemma"]
ARCHS = ("llama", "qwen2", "mistral", "gemma")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Dimensions of the tiny model (row sizes multiples of 256 for K-quants).
HIDDEN = 256
INTERMEDIATE = 512
LAYERS = 2
HEADS = 4
KV_HEADS = 2
VOCAB = 1000

_WORD_SYLLABLES = ("ka", "lo", "ra", "me", "ti", "su", "no", "vi", "da", "pe", "zu", "ho", "ga", "fi", "ne", "ro")
_COMMON_WORDS = ("the", "a", "model", "adapter", "merge", "deploy", "hello", "world", "and", "of", "to", "is")


def _corpus(seed: int, lines: int = 3000) -> str:
    """Deterministic pseudo-text with repeated words, digits and punctuation for tokenizer training."""
    rng = random.Random(seed)
    vocab = list(_COMMON_WORDS)
    vocab += ["".join(rng.choice(_WORD_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    out = []
    for _ in range(lines):
        words = [rng.choice(vocab) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?,;:"))
    return "\n".join(out) + "\n"


def _train_tokenizer(seed: int) -> bytes:
    """Train a SentencePiece BPE model (byte fallback) with exactly ``VOCAB`` pieces; return the serialized model.

    Trained from an in-memory iterator into an in-memory writer so that no file path ends up in the
    model's trainer spec: the same seed gives byte-identical ``tokenizer.model`` files.
    """
    import io

    import sentencepiece as spm

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed).splitlines()),
        model_writer=writer,
        model_type="bpe",
        vocab_size=VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        split_digits=True,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return writer.getvalue()


def _llama_config(dtype: str, tie_word_embeddings: bool, hidden_size: int, intermediate_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )


def _arch_config(arch: str, dtype: str, tie_word_embeddings: bool, hidden_size: int, intermediate_size: int) -> Any:
    """The config of a tiny model of ``arch``: the Llama dims; Qwen2 adds q/k/v biases, Gemma ties embeddings."""
    if arch == "llama":
        return _llama_config(dtype, tie_word_embeddings, hidden_size, intermediate_size)
    import transformers

    name = {"qwen2": "Qwen2Config", "mistral": "MistralConfig", "gemma": "GemmaConfig"}[arch]
    extra: dict[str, Any] = {"head_dim": hidden_size // HEADS} if arch == "gemma" else {}
    return getattr(transformers, name)(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=tie_word_embeddings or arch == "gemma",
        dtype=dtype, **extra,
    )


def _save_tokenizer(model_proto: bytes, out_dir: Path) -> None:
    """Write tokenizer.model plus the transformers side files (tokenizer_config.json, special_tokens_map.json)."""
    (out_dir / "tokenizer.model").write_bytes(model_proto)
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 512,
        "sp_model_kwargs": {},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _save_bpe_tokenizer(seed: int, out_dir: Path, chat_template: str | None) -> None:
    """Write a byte-level BPE ``tokenizer.json`` (GPT-2 style pre-tokenizer) trained on the tiny corpus.

    Its vocabulary is the tiny model's own, so llama.cpp's converter does not know its pre-tokenizer
    hash: the test model for the "unknown BPE pre-tokenizer" trap. Its pre-tokenization is GPT-2's,
    so llama.cpp's ``gpt-2`` pre-tokenizer tokenizes like it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(seed).splitlines(), trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                              "unk_token": "<unk>", "add_bos_token": False, "clean_up_tokenization_spaces": False,
                              "model_max_length": 512}
    if chat_template:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _publish(tmp: Path, out_dir: Path) -> Path:
    """Move a finished temp directory into place (replacing an older one)."""
    out_dir = Path(out_dir)
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def make_base_model(
    out_dir: Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    arch: Arch = "llama",
    hidden_size: int = HIDDEN,
    intermediate_size: int = INTERMEDIATE,
    tokenizer: Literal["sentencepiece", "bpe"] = "sentencepiece",
    chat_template: str | None = None,
) -> Path:
    """Write a tiny random checkpoint (safetensors, config, generation config, tokenizer) to ``out_dir``.

    ``tokenizer="bpe"`` writes a byte-level BPE tokenizer.json whose pre-tokenizer hash llama.cpp does
    not know (instead of the SentencePiece model); ``chat_template`` goes into tokenizer_config.json.

    Deterministic: the same arguments give byte-identical files. ``arch``: ``llama``, ``qwen2`` (q/k/v
    biases, made non-zero), ``mistral`` or ``gemma`` (tied embeddings always); all share the Llama
    dims and the SentencePiece tokenizer. ``hidden_size``/``intermediate_size``
    other than multiples of 256 make llama.cpp's K-quants fall back to other types (used to test that
    the fallback is caught); ``hidden_size`` must be a multiple of 4 * 2 (heads * 2 for RoPE).
    """
    if dtype not in DTYPES:
        raise LoraDeployError(f"unknown dtype {dtype!r}", fix=f"use one of {', '.join(DTYPES)}")
    if arch not in ARCHS:
        raise LoraDeployError(f"unsupported tiny-model arch {arch!r}", fix=f"use one of {', '.join(ARCHS)}")
    if hidden_size <= 0 or hidden_size % (HEADS * 2) or intermediate_size <= 0:
        raise LoraDeployError(
            f"bad tiny-model dims hidden_size={hidden_size!r} intermediate_size={intermediate_size!r}",
            fix=f"use a positive hidden_size divisible by {HEADS * 2} and a positive intermediate_size",
        )
    import torch
    import transformers
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if tokenizer == "bpe":
            _save_bpe_tokenizer(seed, tmp, chat_template)
        else:
            _save_tokenizer(_train_tokenizer(seed), tmp)
            if chat_template:
                config_path = tmp / "tokenizer_config.json"
                config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                                   "chat_template": chat_template}, indent=2) + "\n")
        config = _arch_config(arch, dtype, tie_word_embeddings, hidden_size, intermediate_size)
        torch.manual_seed(seed)
        classes = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                   "gemma": "GemmaForCausalLM"}
        model = getattr(transformers, classes[arch])(config)
        # The default init (std 0.02) gives near-uniform logits; widen it a little so outputs differ by input.
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for name, param in sorted(model.named_parameters()):
                # (Qwen2's q/k/v biases start at zero: made random too)
                if param.dim() >= 2 or (arch != "llama" and name.endswith(".bias")):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        model = model.to(getattr(torch, dtype))
        model.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
        log.info("tiny %s base model (hidden %d, %s, seed %d) written to %s", arch, hidden_size, dtype, seed, out_dir)
        return _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    use_rslora: bool = False,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 1,
    base_model_name_or_path: str | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Write a peft LoRA adapter for the model in ``base_dir`` to ``out_dir`` with seeded non-zero A and B.

    ``adapter_config.json`` gets ``base_model_name_or_path`` (default ``str(base_dir)``). ``lora_kwargs``
    go to ``LoraConfig`` (``use_dora``, ``rank_pattern``, ``lora_bias``, ``modules_to_save``, ...); the
    extra trainable tensors they add (DoRA magnitudes, saved modules, embedding LoRA) are perturbed too,
    so that each feature changes the merge.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        **{"bias": "none", **lora_kwargs},
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name or "lora_embedding_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "lora_magnitude_vector" in name or ("modules_to_save" in name and param.requires_grad) or (
                    lora_kwargs.get("bias", "none") != "none" and name.endswith(".bias") and param.requires_grad):
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        # peft keeps target_modules as a set: sort it so the file does not depend on PYTHONHASHSEED.
        # base_model_name_or_path is set here, not before saving: peft would try to fetch a Hub id.
        config_path = tmp / "adapter_config.json"
        saved = json.loads(config_path.read_text())
        saved["base_model_name_or_path"] = str(base_dir) if base_model_name_or_path is None else base_model_name_or_path
        if isinstance(saved.get("target_modules"), list):
            saved["target_modules"] = sorted(saved["target_modules"])
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        log.info("tiny LoRA adapter (r=%d, alpha=%d, seed %d) written to %s", r, lora_alpha, seed, out_dir)
        return _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
