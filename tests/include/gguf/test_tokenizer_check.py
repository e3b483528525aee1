"""The tokenizer trap with the real pinned converter: vocab routes, unknown BPE pre-tokenizer hash, token equality."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from include.errors import GGUFError
from include.gguf import tokenizer as tc
from include.gguf import vocab_routes as vr
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


def converter_hash(model_dir: Path, source_dir: Path) -> str:
    """The BPE pre-tokenizer hash the converter under ``source_dir`` computes for ``model_dir`` (its recipe)."""
    from transformers import AutoTokenizer

    chktxt, _ = tc.converter_pre_tokenizers(source_dir)
    return hashlib.sha256(str(AutoTokenizer.from_pretrained(str(model_dir)).encode(chktxt)).encode()).hexdigest()


def test_known_hash_is_recognised(bpe_root: Path, tmp_path: Path) -> None:
    """A converter whose table lists the tiny BPE vocab's hash: the name comes from the table, no mapping needed.

    The pinned table cannot know a vocab made up for the tests, so the hash is added to a copy of the converter
    sources, as ``convert_hf_to_gguf_update.py`` adds one upstream.
    """
    pinned = pinned_toolchain().source_dir
    ours = converter_hash(bpe_root / "base", pinned)
    shutil.copytree(pinned / "conversion", tmp_path / "conversion")
    shutil.copyfile(pinned / "convert_hf_to_gguf.py", tmp_path / "convert_hf_to_gguf.py")
    base = tmp_path / "conversion" / "base.py"
    anchor = "        res = None\n"
    assert base.read_text().count(anchor) == 1, "the pinned get_vocab_base_pre() changed its layout"
    base.write_text(base.read_text().replace(anchor, f'{anchor}        if chkhsh == "{ours}":\n'
                                                          '            res = "tiny-test-bpe"\n'))
    assert tc.converter_pre_tokenizers(tmp_path)[1][ours] == "tiny-test-bpe"
    for mapping in (None, "qwen2"):  # a known hash is never overridden by quantize.pre_tokenizer
        result = tc.check_pre_tokenizer(bpe_root / "base", tmp_path, mapping)
        assert {k: result[k] for k in ("kind", "chkhsh", "name", "mapped")} == {
            "kind": "bpe", "chkhsh": ours, "name": "tiny-test-bpe", "mapped": False}, mapping
        assert result["architecture"] == "LlamaForCausalLM" and result["route"] == "llama"


def test_an_unknown_hash_is_taken_under_the_mapped_name(bpe_root: Path) -> None:
    _, table = tc.converter_pre_tokenizers(pinned_toolchain().source_dir)
    ours = converter_hash(bpe_root / "base", pinned_toolchain().source_dir)
    assert ours not in table  # the tiny BPE vocab is unknown to llama.cpp: the trap is real
    result = tc.check_pre_tokenizer(bpe_root / "base", pinned_toolchain().source_dir, "qwen2")
    assert {k: result[k] for k in ("kind", "chkhsh", "name", "mapped")} == {
        "kind": "bpe", "chkhsh": ours, "name": "qwen2", "mapped": True}
    assert result["architecture"] == "LlamaForCausalLM" and result["route"] == "llama"


def test_unknown_bpe_hash_fails_before_converting_with_the_choices(bpe_root: Path) -> None:
    with pytest.raises(GGUFError) as caught:
        tc.check_pre_tokenizer(bpe_root / "base", pinned_toolchain().source_dir, None)
    message = str(caught.value)
    assert "is unknown to this llama.cpp" in message and "quantize.pre_tokenizer" in message
    assert "not a byte-fallback BPE with a Sequence decoder" in message  # why the converter goes to its BPE route
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
    result = tc.check_pre_tokenizer(base, pinned_toolchain().source_dir, None)
    assert result["kind"] == "sentencepiece" and result["chkhsh"] is None and result["reader"] == "tokenizer.model"
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


# ---- vocab routes: the converter's choice of reader decides whether the hash matters -------------------------

SUPPORTED_ROUTES = {  # architecture -> (the pinned converter's class, route)
    "LlamaForCausalLM": ("LlamaModel", "llama"),
    "MistralForCausalLM": ("LlamaModel", "llama"),
    "MixtralForCausalLM": ("LlamaModel", "llama"),
    "Qwen2ForCausalLM": ("Qwen2Model", "sentencepiece-or-bpe"),
    "Qwen3ForCausalLM": ("Qwen3Model", "qwen3"),
    "Phi3ForCausalLM": ("Phi3MiniModel", "phi3"),
    "GemmaForCausalLM": ("GemmaModel", "sentencepiece-only"),
    "Gemma2ForCausalLM": ("Gemma2Model", "sentencepiece-only"),
    "Gemma3ForCausalLM": ("Gemma3Model", "gemma3"),
    "Qwen2MoeForCausalLM": ("Qwen2MoeModel", "bpe"),
}
CONFIGS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
           "Phi3ForCausalLM": "phi3", "GemmaForCausalLM": "gemma"}


@pytest.fixture(scope="session")
def spm_json_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama model with its SentencePiece tokenizer saved only as tokenizer.json (no tokenizer.model)."""
    root = tmp_path_factory.getbasetemp() / "tiny-spm-json"
    if not (root / "base" / "config.json").is_file():
        make_base_model(root / "base", tokenizer="sentencepiece-json")
    return root


def vocab_dir(path: Path, architecture: str, tokenizer_from: Path, extra: tuple[Path, ...] = ()) -> Path:
    """A directory with only a config.json of ``architecture`` and the tokenizer files (enough for --vocab-only)."""
    from transformers import AutoConfig

    path.mkdir(parents=True)
    config = AutoConfig.for_model(CONFIGS[architecture], architectures=[architecture], vocab_size=1000,
                                  hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=64, max_position_embeddings=512, pad_token_id=None,
                                  bos_token_id=1, eos_token_id=2)
    config.save_pretrained(path)
    for source in (*[p for p in sorted(tokenizer_from.glob("*")) if p.name.startswith(("tokenizer", "special"))],
                   *extra):
        shutil.copyfile(source, path / source.name)
    return path


def raw_vocab_only(model_dir: Path, out: Path) -> tuple[int, str]:
    """The pinned converter itself, unwrapped, writing only the vocab: its exit code and output."""
    toolchain = pinned_toolchain()
    proc = subprocess.run([sys.executable, str(toolchain.converter), str(model_dir), "--vocab-only", "--outfile",
                           str(out)], env={**os.environ, "PYTHONPATH": str(toolchain.gguf_py)},
                          capture_output=True, text=True, timeout=600, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_the_route_table_is_pinned_against_the_converter_source() -> None:
    source = pinned_toolchain().source_dir
    for architecture, (cls, route) in SUPPORTED_ROUTES.items():
        found_cls, found = vr.route_for(source, architecture)
        fingerprint = vr.set_vocab_of(source, architecture)
        assert (found_cls, found.name if found else None) == (cls, route), (
            f"the pinned converter's set_vocab() for {architecture} changed: {fingerprint}; update vocab_routes.ROUTES")
    # every route in the table is one the pinned converter really has (no stale fingerprints)
    used = {r.name for a in vr.converter_architectures(source) if (r := vr.route_for(source, a)[1]) is not None}
    assert used == {r.name for r in vr.ROUTES}
    assert vr.route_for(source, "NoSuchForCausalLM") == (None, None)


def test_a_changed_converter_route_is_unchecked_not_refused(bpe_root: Path, tmp_path: Path) -> None:
    """A llama.cpp whose LlamaModel.set_vocab differs: no pre-check (the converter decides), never a refusal."""
    pinned = pinned_toolchain().source_dir
    shutil.copytree(pinned / "conversion", tmp_path / "conversion")
    shutil.copyfile(pinned / "convert_hf_to_gguf.py", tmp_path / "convert_hf_to_gguf.py")
    llama = tmp_path / "conversion" / "llama.py"
    text = llama.read_text()
    assert text.count("self._set_vocab_llama_hf()") == 1
    llama.write_text(text.replace("self._set_vocab_llama_hf()", "self._set_vocab_gpt2()"))
    assert vr.route_for(tmp_path, "LlamaForCausalLM") == ("LlamaModel", None)
    result = tc.check_pre_tokenizer(bpe_root / "base", tmp_path, None)  # the pinned route would refuse it
    assert result["kind"] == "unchecked" and result["mapped"] is False and "LlamaModel" in result["reader"]
    mapped = tc.check_pre_tokenizer(bpe_root / "base", tmp_path, "gpt-2")
    assert mapped["kind"] == "unchecked" and mapped["name"] == "gpt-2" and mapped["mapped"] is True


def test_sentencepiece_tokenizer_json_is_accepted_converted_and_tokens_match(spm_json_root: Path) -> None:
    from transformers import AutoTokenizer

    base = spm_json_root / "base"
    assert (base / "tokenizer.json").is_file() and not (base / "tokenizer.model").is_file()
    source = pinned_toolchain().source_dir
    chktxt, table = tc.converter_pre_tokenizers(source)
    ids = AutoTokenizer.from_pretrained(str(base)).encode(chktxt)
    assert hashlib.sha256(str(ids).encode()).hexdigest() not in table  # a hash check would have refused it
    result = tc.check_pre_tokenizer(base, source, None)
    assert result == {"kind": "llama-hf", "chkhsh": None, "name": None, "mapped": False,
                      "architecture": "LlamaForCausalLM", "route": "llama",
                      "reader": "SentencePiece-style tokenizer.json"}
    path = spm_json_root / "f16.gguf"
    summary = convert_to_gguf(base, path, toolchain=pinned_toolchain())  # the plain converter, no mapping
    assert summary.metadata["tokenizer.ggml.model"] == "llama" and summary.metadata["tokenizer.ggml.pre"] == "default"
    compared = tc.compare_tokenization(path, base)
    assert compared["equal"] and compared["tokens"] > 100


@pytest.mark.parametrize(("architecture", "files", "ours", "converter"), [
    # the same tokenizer.json: Llama-family reads it as SentencePiece; Qwen2 goes to BPE, where the hash is unknown
    ("MistralForCausalLM", "spm-json", "llama-hf", "llama"),
    ("Qwen2ForCausalLM", "spm-json", "is unknown to this llama.cpp", "BPE pre-tokenizer was not recognized"),
    # architectures whose converter reads only tokenizer.model
    ("Phi3ForCausalLM", "spm-json", "Phi3ForCausalLM needs tokenizer.model, which", "ValueError: Error: Missing"),
    ("Phi3ForCausalLM", "spm-json+model", "sentencepiece", "llama"),
    ("GemmaForCausalLM", "spm-json", "GemmaForCausalLM needs tokenizer.model, which", "File not found"),
    ("LlamaForCausalLM", "none", "LlamaForCausalLM needs tokenizer.model or tokenizer.json", "_set_vocab_gpt2"),
], ids=["mistral-llama-hf", "qwen2-bpe", "phi3-no-model", "phi3-model", "gemma-no-model", "llama-no-tokenizer"])
def test_routes_agree_with_the_raw_converter(spm_json_root: Path, gguf_root: Path, tmp_path: Path,
                                             architecture: str, files: str, ours: str, converter: str) -> None:
    """Each decision against the unwrapped pinned converter (--vocab-only): accepted <=> the converter succeeds."""
    tiny_gguf(gguf_root, "f16")  # builds the SentencePiece tiny model (tokenizer.model)
    extra = (gguf_root / "tiny-base" / "tokenizer.model",) if files == "spm-json+model" else ()
    tokenizer_from = spm_json_root / "base" if files != "none" else tmp_path / "empty"
    tokenizer_from.mkdir(exist_ok=True)
    model = vocab_dir(tmp_path / "model", architecture, tokenizer_from, extra)
    code, output = raw_vocab_only(model, tmp_path / "vocab.gguf")
    try:
        result = tc.check_pre_tokenizer(model, pinned_toolchain().source_dir, None)
    except GGUFError as e:
        assert ours in str(e) and str(model) in str(e) and "Fix:" in str(e)
        assert code != 0 and converter in output, output[-2000:]
        return
    assert result["kind"] == ours and result["architecture"] == architecture
    assert code == 0, output[-2000:]
    assert inspect_gguf(tmp_path / "vocab.gguf").metadata["tokenizer.ggml.model"] == converter
