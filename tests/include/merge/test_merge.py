"""The streaming merge against its oracle, peft's ``merge_and_unload``, on tiny Llama, Qwen2, Mistral and Gemma.

How results are compared:

- float32: max abs diff to peft <= 1e-6 (in practice a few 1e-8: peft sums the rank terms in float32).
- bfloat16: the streaming merge computes in float64 and rounds once, so it must be *bit-identical* to
  peft run in float64 (``.double()``) and cast to bfloat16. Against peft run natively (float32
  arithmetic on the bf16 weights, as users run it) it must be within 1 ulp, where "ulp" is the bf16
  spacing at the magnitude of the largest operand of the sum (``max(|W|, |D|, |W + D|)``). That is the
  error bound of peft's own float32 additions: near cancellation (W + D close to 0) peft's result has
  float32 rounding noise of the operands' size, which is several ulps *of the small result*.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from include.merge.safetensors_io import INDEX_FILE, TensorSpec, list_model_tensors, read_tensor
from include.merge.streaming import merge_lora
from include.merge.writer import ShardedWriter
from tests.include.merge.test_merge_oracle import ADAPTERS, build_models, peft_merged
from tests.include.merge.test_safetensors_io import load_all


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases (four architectures, fp32 and bf16) and one adapter per LoRA feature, built once."""
    return build_models(tmp_path_factory.getbasetemp() / "merge-models")


def file_or_tied(ours: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A merged tensor; a tied lm_head (absent from the file, as transformers saves it) is the embedding."""
    return ours[key] if key in ours else ours["model.embed_tokens.weight"]


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_fp32_merge_matches_peft(models: dict[str, Path], adapter: str, tmp_path: Path) -> None:
    base_name = ADAPTERS[adapter][0]
    out = tmp_path / "merged"
    result = merge_lora(models[base_name], models[adapter], out)
    ref = peft_merged(models[base_name], models[adapter])
    ours = load_all(out)
    base = load_file(models[base_name] / "model.safetensors")
    tied = json.loads((models[base_name] / "config.json").read_text()).get("tie_word_embeddings")
    assert sorted(ours) == sorted(base)  # same tensors as the base (a tied lm_head stays absent)
    assert set(ref) - set(ours) == ({"lm_head.weight"} if tied else set())
    assert result["tensors"] == len(base) and result["dtype"] == "float32"
    worst = max((file_or_tied(ours, k) - ref[k]).abs().max().item() for k in ref)
    print(f"{adapter}: {result['merged_tensors']} tensors edited ({result['features']}), max abs diff {worst:.3g}")
    assert worst <= 1e-6
    changed_by_peft = {k for k in base if not torch.equal(ref[k], base[k])}
    changed_by_us = {k for k in base if not torch.equal(ours[k], base[k])}
    assert changed_by_us == changed_by_peft and changed_by_us  # everything else bit-identical to the base
    if adapter == "gemma_tied_embedding":
        assert "model.embed_tokens.weight" in changed_by_us and torch.equal(ref["lm_head.weight"],
                                                                            ref["model.embed_tokens.weight"])
    if "bias" in adapter:
        assert any(k.endswith(".bias") for k in changed_by_us)


def features_of(models: dict[str, Path], adapter: str, tmp_path: Path) -> list[str]:
    return merge_lora(models[ADAPTERS[adapter][0]], models[adapter], tmp_path / "f")["features"]


def test_each_case_exercises_its_feature(models: dict[str, Path], tmp_path: Path) -> None:
    expected = {"dora": "DoRA", "embedding": "embedding LoRA", "modules_to_save": "replaced tensors",
                "qwen2_lora_bias": "LoRA bias", "qwen2_trained_bias": "replaced tensors",
                "gemma_tied_embedding": "embedding LoRA"}
    for adapter, feature in expected.items():
        shutil.rmtree(tmp_path / "f", ignore_errors=True)
        assert feature in features_of(models, adapter, tmp_path), adapter
    config = json.loads((models["patterns"] / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]


def bf16_ulp_at(magnitude: torch.Tensor) -> torch.Tensor:
    """The bfloat16 spacing (1 ulp) at each magnitude: 2**(exponent - 7)."""
    return torch.pow(2.0, torch.floor(torch.log2(magnitude.clamp_min(2.0**-126))) - 7)


@pytest.mark.parametrize(("base", "adapter"), [("llama16", "r8_a16"), ("qwen16", "qwen2"),
                                               ("mistral16", "mistral"), ("llama16", "dora")])
def test_bf16_is_exact_and_within_one_ulp_of_peft(models: dict[str, Path], base: str, adapter: str,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = merge_lora(models[base], models[adapter], out)
    assert result["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ours, weights = load_all(out), load_all(models[base])
    exact, native = peft_merged(models[base], models[adapter], "float64"), peft_merged(models[base], models[adapter])
    differing = total = 0
    worst = 0.0
    for key, want in native.items():
        got = ours[key]
        assert got.dtype == want.dtype == torch.bfloat16, key
        assert torch.equal(got, exact[key].to(torch.bfloat16)), key  # exact merge, rounded once
        w = weights[key].double()
        magnitude = torch.maximum(torch.maximum(w.abs(), (exact[key] - w).abs()), exact[key].abs())
        worst = max(worst, float(((got.double() - want.double()).abs() / bf16_ulp_at(magnitude)).max()))
        differing += int((got != want).sum())
        total += want.numel()
    print(f"{base}+{adapter}: bit-identical to peft in float64; {differing}/{total} elements differ from native "
          f"peft, max {worst:.2f} ulp at the operands' magnitude")
    assert worst <= 1.0 and differing / total < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_conversion_equals_peft_cast(models: dict[str, Path], dtype: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    result = merge_lora(models["llama32"], models["r8_a16"], out, dtype=dtype)
    target = getattr(torch, dtype)
    exact = peft_merged(models["llama32"], models["r8_a16"], "float64")
    native = peft_merged(models["llama32"], models["r8_a16"])
    ours = load_all(out)
    assert result["dtype"] == dtype and {t.dtype for t in ours.values()} == {target}
    differing = sum(int((ours[k] != v.to(target)).sum()) for k, v in native.items())
    for key, value in exact.items():  # float64 -> float32 -> dtype: what casting peft's exact merge gives
        assert torch.equal(ours[key], value.float().to(target)), key
    print(f"fp32 -> {dtype}: {differing} elements differ from native peft + cast")
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert AutoModelForCausalLM.from_pretrained(out).dtype == target


def test_sharded_output_loads_and_equals_single_file(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    merge_lora(models["llama32"], models["r8_a16"], single)
    result = merge_lora(models["llama32"], models["r8_a16"], sharded, max_shard_bytes=1024**2)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in list_model_tensors(sharded).values())
    assert result["files"] == sorted(result["files"]) and INDEX_FILE in result["files"]
    assert result["bytes"] == sum((sharded / s).stat().st_size for s in shards)
    a, b = load_all(single), load_all(sharded)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    state = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert all(torch.equal(state[k], a[k]) for k in a)

    # A sharded base (written by our writer, with an index) merges to the same tensors.
    base = tmp_path / "base_sharded"
    shutil.copytree(models["llama32"], base, ignore=shutil.ignore_patterns("*.safetensors"))
    infos = list_model_tensors(models["llama32"])
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in infos.items()]
    with ShardedWriter(base, specs, max_shard_bytes=512 * 1024) as writer:
        for name, info in infos.items():
            writer.write(name, read_tensor(info))
    assert (base / INDEX_FILE).is_file()
    merge_lora(base, models["r8_a16"], tmp_path / "from_sharded_base")
    c = load_all(tmp_path / "from_sharded_base")
    assert sorted(c) == sorted(a) and all(torch.equal(a[k], c[k]) for k in a)


def test_side_files_copied_weights_not(models: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(models["llama32"], base)
    (base / "pytorch_model.bin").write_bytes(b"old weights")
    (base / "README.md").write_text("card")
    (base / "original").mkdir()
    (base / "original" / "params.json").write_text("{}")
    (base / "original" / "consolidated.00.pth").write_bytes(b"x")
    (base / ".cache").mkdir()
    (base / ".cache" / "lock").write_text("")
    out = tmp_path / "merged"
    out.mkdir()  # an existing empty out dir is fine
    result = merge_lora(base, models["r8_a16"], out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == result["files"] == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "original/params.json",
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json",
    ]
    for name in ("tokenizer.model", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()


def test_fan_in_fan_out_conv1d_dora_and_small_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 keeps Conv1D weights as (in, out): peft's LoRA uses fan_in_fan_out there; DoRA then normalises
    stored columns (a two-pass merge); tiny blocks force many row blocks per tensor."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    base_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(gpt2).save_pretrained(base_dir)
    monkeypatch.setattr("include.merge.arithmetic.BLOCK_BYTES", 2000)  # ~4 rows of 64 float64 per block
    for use_dora in (False, True):
        adapter_dir = tmp_path / f"gpt2_lora_{use_dora}"
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                            use_dora=use_dora)
        peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir), config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.normal_(0, 0.05)
                elif "lora_magnitude" in name:
                    param.mul_(1.5)
        peft_model.save_pretrained(adapter_dir)
        result = merge_lora(base_dir, adapter_dir, tmp_path / f"merged_{use_dora}")
        assert result["merged_tensors"] == 3 * 2  # c_attn, attn.c_proj, mlp.c_proj per layer
        ref = peft_merged(base_dir, adapter_dir)
        ours = load_all(tmp_path / f"merged_{use_dora}")
        assert ours["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # (in, out)
        worst = max((ours[k] - ref[k]).abs().max().item() for k in ours)
        print(f"gpt2 fan_in_fan_out (DoRA {use_dora}): max abs diff vs peft {worst:.3g}")
        assert worst <= 1e-6
