"""Tests of include.tiny_model: the offline tiny Llama base model and its LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from include.errors import LoraDeployError
from include.hashing import sha256_file
from include.tiny_model import HIDDEN, INTERMEDIATE, VOCAB, make_base_model, make_lora_adapter

FILES = ("model.safetensors", "tokenizer.model", "config.json", "generation_config.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bfloat16 base model and an adapter for it."""
    root = tmp_path_factory.mktemp("tiny-model")
    base = make_base_model(root / "base", dtype="bfloat16")
    adapter = make_lora_adapter(base, root / "adapter", r=4, lora_alpha=8, base_model_name_or_path="me/tiny-base")
    return base, adapter


def test_base_model_loads_with_transformers(tiny: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer

    base, _ = tiny
    config = json.loads((base / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == (HIDDEN, INTERMEDIATE, VOCAB)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (4, 2, 2)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    for tokenizer in (AutoTokenizer.from_pretrained(base), LlamaTokenizer.from_pretrained(base)):
        assert len(tokenizer) == VOCAB
        ids = tokenizer("Hello world, deploy the model 2024! ünïcødé")["input_ids"]
        assert ids[0] == tokenizer.bos_token_id == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world, deploy the model 2024! ünïcødé"
        assert max(ids) < VOCAB
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), VOCAB)
    assert torch.isfinite(logits).all()


def test_adapter_is_a_real_non_zero_lora(tiny: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    _, adapter = tiny
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "me/tiny-base"
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert config["target_modules"] == sorted(config["target_modules"])
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    tensors = load_file(adapter / "adapter_model.safetensors")
    b_tensors = {name: t for name, t in tensors.items() if "lora_B" in name}
    assert len(b_tensors) == 2 * 7  # two layers, seven target modules
    assert all(t.abs().max() > 0 for t in b_tensors.values())


def test_same_arguments_give_same_files(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = tiny
    again = make_base_model(tmp_path / "base", dtype="bfloat16")
    again_adapter = make_lora_adapter(again, tmp_path / "adapter", r=4, lora_alpha=8,
                                      base_model_name_or_path="me/tiny-base")
    for name in FILES:
        assert sha256_file(again / name) == sha256_file(base / name), name
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert sha256_file(again_adapter / name) == sha256_file(adapter / name), name
    other = make_base_model(tmp_path / "other", dtype="bfloat16", seed=5)
    assert sha256_file(other / "model.safetensors") != sha256_file(base / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "other"]  # no temp dirs left


def test_default_base_model_name_is_the_base_dir(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = tiny
    adapter = make_lora_adapter(base, tmp_path / "adapter", target_modules=("q_proj",))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert config["target_modules"] == ["q_proj"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"dtype": "float8"}, "'float8'"), ({"arch": "gpt2"}, "'gpt2'"), ({"hidden_size": 250}, "250")],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(LoraDeployError, match=needle):
        make_base_model(tmp_path / "base", **kwargs)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma"])
def test_other_architectures_load_and_differ(arch: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    base = make_base_model(tmp_path / arch, arch=arch, dtype="bfloat16")  # type: ignore[arg-type]
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == arch and config["hidden_size"] == HIDDEN
    model = AutoModelForCausalLM.from_pretrained(base)
    state = model.state_dict()
    if arch == "qwen2":  # q/k/v biases exist and are non-zero (so LoRA bias and trained biases matter)
        assert all(state[f"model.layers.0.self_attn.{p}.bias"].abs().max() > 0 for p in ("q_proj", "k_proj", "v_proj"))
    assert config["tie_word_embeddings"] is (arch == "gemma")
    if arch == "gemma":
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, VOCAB) and torch.isfinite(logits).all()
