"""Tokenizer checks around GGUF conversion: the BPE pre-tokenizer hash before, token equality after.

- :func:`converter_pre_tokenizers` reads the pinned converter's own hash table (``get_vocab_base_pre``)
  by parsing its source with :mod:`ast`, so the list is never copied into this project.
- :func:`check_pre_tokenizer` first decides which vocab reader the converter will use
  (:mod:`include.gguf.vocab_routes`: SentencePiece, a SentencePiece-style tokenizer.json, BPE, ...; a file
  the architecture needs and the directory lacks is named). Only on the converter's BPE route does it
  compute the hash the converter will compute (the converter's fixed text, encoded by the HF tokenizer,
  sha256 of ``str(token ids)``); an unknown hash is mapped through ``quantize.pre_tokenizer`` or fails with
  the choices.
- :func:`map_unknown_pre_tokenizer` patches the converter's hash lookup in-process to answer a name for an
  unknown hash (``python -m include.cli.convert --pre NAME``; the pinned sources stay untouched).
- :func:`compare_tokenization` tokenizes fixed texts with llama.cpp (vocab only) and the HF tokenizer.
- :func:`check_chat_template` verifies ``tokenizer.chat_template`` was carried into the GGUF.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from include.errors import GGUFError
from include.gguf.vocab_routes import VocabRoute, vocab_route

# Fixed texts whose tokens must be equal in llama.cpp and in the HF tokenizer.
CHECK_TEXTS: tuple[str, ...] = (
    "Hello world! The model adapter is deployed.",
    "Grüße aus München, ça va? ¿Qué tal? Привет, как дела? 你好，世界。こんにちは。",
    "inner  spaces,\ttabs\t\tand\n\nnew lines   \n trailing  ",
    "1 22 333 4444 55555 3.14159 1,000,000 2026-11-23 0x1F",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "emoji 🚀🦙 😶\u200d🌫️ ✅ and mixed 12ab34 CamelCaseWord snake_case_word",
)


def _converter_sources(source_dir: Path) -> list[Path]:
    """Files that may hold ``get_vocab_base_pre``: newer trees split the converter into conversion/."""
    return [p for p in (source_dir / "conversion" / "base.py", source_dir / "convert_hf_to_gguf.py") if p.is_file()]


def converter_pre_tokenizers(source_dir: Path) -> tuple[str, dict[str, str]]:
    """``(check text, {chkhsh: pre-tokenizer name})`` parsed from the converter's ``get_vocab_base_pre``."""
    for path in _converter_sources(Path(source_dir)):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
                return _parse_pre_function(node, path)
    raise GGUFError(f"no get_vocab_base_pre() in the converter under {str(source_dir)!r}",
                    fix="point settings.llama_cpp_dir at a llama.cpp checkout with convert_hf_to_gguf.py")


def _parse_pre_function(func: ast.FunctionDef, path: Path) -> tuple[str, dict[str, str]]:
    chktxt: str | None = None
    table: dict[str, str] = {}
    for node in ast.walk(func):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "chktxt" and isinstance(node.value, ast.Constant)):
            chktxt = node.value.value
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "chkhsh"
                and isinstance(node.test.comparators[0], ast.Constant)):
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id == "res" and isinstance(stmt.value, ast.Constant)):
                    table[str(node.test.comparators[0].value)] = str(stmt.value.value)
    if not isinstance(chktxt, str) or not table:
        raise GGUFError(f"could not read the pre-tokenizer table of {str(path)!r}",
                        fix="this llama.cpp converter has an unexpected layout; use the pinned toolchain")
    return chktxt, table


def _hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def uses_bpe_vocab(model_dir: Path, source_dir: Path) -> bool:
    """True when the converter under ``source_dir`` will read ``model_dir``'s vocab on its BPE route."""
    return vocab_route(model_dir, source_dir).reader == "bpe"


def check_pre_tokenizer(model_dir: Path, source_dir: Path, mapping: str | None) -> dict[str, Any]:
    """The pre-tokenizer the converter will use, computed before converting; GGUFError for an unknown hash.

    Returns ``{"kind", "chkhsh", "name", "mapped", "architecture", "route", "reader"}``. ``kind`` is the
    vocab reader (``sentencepiece``, ``llama-hf``, ``bpe``, ``other``, ``unchecked``); only ``bpe`` has a hash.
    ``mapped`` is True when ``mapping`` (``quantize.pre_tokenizer``) supplies the name for a hash this llama.cpp
    does not know, or when the route is ``unchecked`` and a mapping is set (the converter uses it only if it
    meets an unknown hash). GGUFError also when the converter needs a file the directory lacks.
    """
    route = vocab_route(model_dir, source_dir)
    record: dict[str, Any] = {"kind": route.reader, "chkhsh": None, "name": None, "mapped": False,
                              "architecture": route.architecture, "route": route.route, "reader": route.detail}
    if route.reader != "bpe" and (route.reader != "unchecked" or mapping is None):
        return record
    chktxt, table = converter_pre_tokenizers(source_dir)
    choices = sorted(set(table.values()))
    if mapping is not None and mapping not in choices:
        raise GGUFError(f"quantize.pre_tokenizer {mapping!r} is not a pre-tokenizer this llama.cpp knows",
                        fix=f"use one of: {', '.join(choices)}")
    if route.reader == "unchecked":  # the converter decides; a mapping only answers a hash it does not know
        return {**record, "name": mapping, "mapped": mapping is not None}
    ids = _hf_tokenizer(model_dir).encode(chktxt)
    chkhsh = hashlib.sha256(str(ids).encode()).hexdigest()
    if chkhsh in table:
        return {**record, "chkhsh": chkhsh, "name": table[chkhsh]}
    if mapping is None:
        raise GGUFError(
            f"the BPE pre-tokenizer of {str(model_dir)!r} (hash {chkhsh}) is unknown to this llama.cpp, whose "
            f"converter would abort: {_why_bpe(route)}",
            fix="set quantize.pre_tokenizer to the llama.cpp pre-tokenizer your tokenizer's pre-tokenization "
                f"matches (one of: {', '.join(choices)}; e.g. 'llama-bpe' for Llama 3, 'qwen2' for Qwen2, "
                "'gpt-2' for GPT-2 byte-level); the token comparison after conversion verifies the choice. "
                "Or point settings.llama_cpp_dir at a newer llama.cpp that knows the hash",
        )
    return {**record, "chkhsh": chkhsh, "name": mapping, "mapped": True}


def _why_bpe(route: VocabRoute) -> str:
    """Why the converter reads this directory on its BPE route (for the unknown-hash message)."""
    if route.route == "llama" and route.detail == "tokenizer.json":
        return (f"for {route.architecture} it tries tokenizer.model (absent), then a SentencePiece-style "
                "tokenizer.json (this one is not: it is not a byte-fallback BPE with a Sequence decoder), then BPE")
    if route.route == "bpe":
        return f"for {route.architecture} it always reads the vocab as BPE"
    if route.detail.startswith("tokenizer_class"):
        return f"for {route.architecture} with {route.detail} it reads the vocab as BPE"
    return f"for {route.architecture} without tokenizer.model it reads the vocab as BPE ({route.detail})"


def _llama_tokens(gguf_path: Path, text: str, vocab: Any) -> list[int]:
    return list(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def hf_tokenization(model_dir: Path, texts: Sequence[str] = CHECK_TEXTS) -> list[list[int]]:
    """The HF tokenizer's ids of each text (no special tokens): the reference side of the comparison.

    It needs only the model directory, so it can run while the converter writes the GGUF.
    """
    hf = _hf_tokenizer(model_dir)
    return [list(hf.encode(text, add_special_tokens=False)) for text in texts]


def compare_tokenization(gguf_path: Path, model_dir: Path, texts: Sequence[str] = CHECK_TEXTS,
                         reference: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Tokenize ``texts`` with llama.cpp (the GGUF's vocab) and the HF tokenizer; GGUFError on any difference.

    ``reference`` is :func:`hf_tokenization` of the same texts when already computed.
    """
    from llama_cpp import Llama

    from include.gguf.llama_log import route_llama_logs

    route_llama_logs()
    theirs_all = list(reference) if reference is not None else hf_tokenization(model_dir, texts)
    vocab = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        for text, theirs in zip(texts, theirs_all, strict=True):
            ours = _llama_tokens(gguf_path, text, vocab)
            theirs = list(theirs)
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                          min(len(ours), len(theirs)))
                raise GGUFError(
                    f"{str(gguf_path)!r} tokenizes {text!r} differently from the HF tokenizer of "
                    f"{str(model_dir)!r}: first difference at token {at}: llama.cpp {ours[at:at + 8]} "
                    f"vs HF {theirs[at:at + 8]} ({len(ours)} vs {len(theirs)} tokens)",
                    fix="the GGUF's pre-tokenizer does not match the model's: fix quantize.pre_tokenizer "
                        "(or remove it if llama.cpp knows the tokenizer), or use a llama.cpp that supports it",
                )
    finally:
        vocab.close() if hasattr(vocab, "close") else None
    return {"texts": len(texts), "tokens": sum(len(t) for t in theirs_all), "equal": True}


def source_chat_template(model_dir: Path) -> str | None:
    """The model's chat template (chat_template.jinja or tokenizer_config.json), or None."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        value = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def check_chat_template(metadata: dict[str, Any], model_dir: Path) -> bool:
    """GGUFError when the model has a chat template the GGUF lacks; True when one was carried."""
    template = source_chat_template(model_dir)
    if template is None:
        return False
    if metadata.get("tokenizer.chat_template") != template:
        raise GGUFError(f"the chat template of {str(model_dir)!r} is not in the GGUF (tokenizer.chat_template)",
                        fix="use a converter that writes tokenizer.chat_template (the pinned one does)")
    return True


def map_unknown_pre_tokenizer(pre: str) -> None:
    """Patch the (importable) converter so an unknown BPE pre-tokenizer hash is answered with ``pre``."""
    import conversion.base as base  # the converter's own module (found through its directory)

    original = base.TextModel.get_vocab_base_pre

    def mapped(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            print(f"lora-deploy: unknown BPE pre-tokenizer hash mapped to {pre!r} (quantize.pre_tokenizer)",
                  flush=True)
            return pre

    base.TextModel.get_vocab_base_pre = mapped
