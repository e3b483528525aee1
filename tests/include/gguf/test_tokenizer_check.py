"""The tokenizer trap with the real pinned converter: unknown BPE pre-tokenizer hash, mapping, token equality."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from include.errors import GGUFError
from include.gguf import tokenizer as tc
from include.gguf.convert import convert_to_gguf
from include.gguf.reader import inspect_gguf
from include.gguf.toolchain import pinned_toolchain
from tests.fixtures.tiny_model import make_base_model
from tests.gguf_helpers import tiny_gguf

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


@pytest.fixture(scope="session")
def bpe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a byte-level BPE tokenizer llama.cpp does not know, plus a chat template."""
    root = tmp_path_factory.getbasetemp() / "tiny-bpe"
    if not (root / "base" / "config.json").is_file():
        make_base_model(root / "base", tokenizer="bpe", chat_template=TEMPLATE)
    return root


def bpe_gguf(root: Path, pre: str) -> Path:
    """The BPE model converted with ``pre`` as the mapped pre-tokenizer (once per session)."""
    path = root / f"f16-{pre}.gguf"
    if not path.is_file():
        convert_to_gguf(root / "base", path, toolchain=pinned_toolchain(), pre_tokenizer=pre)
    return path


def test_the_converter_table_is_read_from_the_pinned_sources() -> None:
    chktxt, table = tc.converter_pre_tokenizers(pinned_toolchain().source_dir)
    assert "\n \n\n" in chktxt and "🚀" in chktxt
    assert {"llama-bpe", "qwen2", "gpt-2"} <= set(table.values())
    assert all(len(h) == 64 for h in table)
    assert len(table) > 50


def test_known_hash_is_recognised(bpe_root: Path) -> None:
    from transformers import AutoTokenizer

    chktxt, table = tc.converter_pre_tokenizers(pinned_toolchain().source_dir)
    ids = AutoTokenizer.from_pretrained(str(bpe_root / "base")).encode(chktxt)
    ours = hashlib.sha256(str(ids).encode()).hexdigest()
    assert ours not in table  # the tiny BPE vocab is unknown to llama.cpp: the trap is real
    result = tc.check_pre_tokenizer(bpe_root / "base", pinned_toolchain().source_dir, "qwen2")
    assert result == {"kind": "bpe", "chkhsh": ours, "name": "qwen2", "mapped": True}


def test_unknown_bpe_hash_fails_before_converting_with_the_choices(bpe_root: Path) -> None:
    with pytest.raises(GGUFError) as caught:
        tc.check_pre_tokenizer(bpe_root / "base", pinned_toolchain().source_dir, None)
    message = str(caught.value)
    assert "is unknown to this llama.cpp" in message and "quantize.pre_tokenizer" in message
    assert "llama-bpe" in message and "qwen2" in message and "gpt-2" in message
    with pytest.raises(GGUFError, match=r"'no-such-pre' is not a pre-tokenizer this llama.cpp knows"):
        tc.check_pre_tokenizer(bpe_root / "base", pinned_toolchain().source_dir, "no-such-pre")


def test_the_plain_converter_aborts_on_it_and_our_hint_names_the_setting(bpe_root: Path, tmp_path: Path) -> None:
    with pytest.raises(GGUFError) as caught:
        convert_to_gguf(bpe_root / "base", tmp_path / "x.gguf", toolchain=pinned_toolchain())
    assert "BPE pre-tokenizer was not recognized" in str(caught.value)
    assert "quantize.pre_tokenizer" in str(caught.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_mapping_converts_and_tokens_match(bpe_root: Path) -> None:
    path = bpe_gguf(bpe_root, "gpt-2")
    summary = inspect_gguf(path)
    assert summary.metadata["tokenizer.ggml.pre"] == "gpt-2"
    assert summary.metadata["tokenizer.ggml.model"] == "gpt2"
    result = tc.compare_tokenization(path, bpe_root / "base")
    assert result["equal"] and result["texts"] == len(tc.CHECK_TEXTS) and result["tokens"] > 100
    assert tc.check_chat_template(summary.metadata, bpe_root / "base") is True
    assert summary.metadata["tokenizer.chat_template"] == TEMPLATE
    # the pinned sources were not edited by the mapping
    assert "lora-deploy" not in (pinned_toolchain().source_dir / "conversion" / "base.py").read_text()


def test_a_wrong_mapping_is_caught_by_the_token_comparison(bpe_root: Path) -> None:
    path = bpe_gguf(bpe_root, "llama-bpe")  # splits digits differently from the tokenizer's GPT-2 regex
    with pytest.raises(GGUFError) as caught:
        tc.compare_tokenization(path, bpe_root / "base")
    message = str(caught.value)
    assert "tokenizes '1 22 333" in message and "first difference at token" in message
    assert "llama.cpp [" in message and "vs HF [" in message


def test_a_different_tokenizer_is_caught(bpe_root: Path, gguf_root: Path) -> None:
    sp_gguf = tiny_gguf(gguf_root, "f16")  # the SentencePiece tiny model
    with pytest.raises(GGUFError, match="differently from the HF tokenizer"):
        tc.compare_tokenization(sp_gguf, bpe_root / "base")


def test_sentencepiece_model_needs_no_hash_and_tokens_match(gguf_root: Path) -> None:
    path = tiny_gguf(gguf_root, "f16")
    base = gguf_root / "tiny-base"
    assert tc.check_pre_tokenizer(base, pinned_toolchain().source_dir, None)["kind"] == "sentencepiece"
    assert tc.compare_tokenization(path, base)["equal"]
    assert tc.check_chat_template(inspect_gguf(path).metadata, base) is False  # it has none


def test_precomputed_reference_is_what_gets_compared(gguf_root: Path) -> None:
    """The convert task computes the HF side while converting; the comparison uses exactly those ids."""
    path, base = tiny_gguf(gguf_root, "f16"), gguf_root / "tiny-base"
    reference = tc.hf_tokenization(base)
    assert tc.compare_tokenization(path, base, reference=reference)["tokens"] == sum(map(len, reference))
    reference[2] = reference[2][:-1]
    with pytest.raises(GGUFError, match=re.escape(f"tokenizes {tc.CHECK_TEXTS[2]!r} differently")):
        tc.compare_tokenization(path, base, reference=reference)


def test_missing_chat_template_is_reported(bpe_root: Path) -> None:
    with pytest.raises(GGUFError, match=r"chat template .* is not in the GGUF"):
        tc.check_chat_template({"tokenizer.chat_template": "other"}, bpe_root / "base")
