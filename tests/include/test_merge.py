"""The streaming merge against its oracle, peft's ``merge_and_unload``, on a tiny generated Llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from include.errors import MergeError
from include.lora_adapter import same_base
from include.merge import merge_lora
from include.safetensors_io import INDEX_FILE, ShardedWriter, TensorSpec, list_model_tensors, read_tensor
from include.tiny_model import make_base_model, make_lora_adapter
from tests.include.test_safetensors_io import load_all

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = {  # name -> make_lora_adapter kwargs
    "r8_a16": {},
    "r16_rslora": {"r": 16, "lora_alpha": 8, "use_rslora": True, "seed": 2},
    "r4_qv_only": {"r": 4, "lora_alpha": 32, "target_modules": ("q_proj", "v_proj"), "seed": 3},
}
LAYERS = 2


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bases (fp32, bf16) and adapters, built once per session."""
    root = tmp_path_factory.mktemp("models")
    out = {"base32": make_base_model(root / "base32"), "base16": make_base_model(root / "base16", dtype="bfloat16")}
    for name, kwargs in ADAPTERS.items():
        out[name] = make_lora_adapter(out["base32"], root / name, **kwargs)
    return out


_ORACLE: dict[tuple[Path, Path], dict[str, torch.Tensor]] = {}


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload state dict (cached per base/adapter pair)."""
    if (base, adapter) not in _ORACLE:
        model = AutoModelForCausalLM.from_pretrained(base)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        _ORACLE[base, adapter] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return _ORACLE[base, adapter]



def ulp_stats(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(elements differing, elements, max ulp difference, max ulp where |ref| > 1e-4) of 16-bit float tensors.

    Near zero, W + delta cancels and a last-bit difference in the float32 delta (summation order of the
    matmul: MKL in torch, OpenBLAS in numpy) is several 16-bit ulps; away from zero it is at most one.
    """
    differing = total = max_ulp = max_away = 0
    for key, want in ref.items():
        got = ours[key]
        assert got.dtype == want.dtype, key
        ulps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
        differing += int((ulps > 0).sum())
        total += want.numel()
        max_ulp = max(max_ulp, int(ulps.max()))
        max_away = max(max_away, int(ulps[want.float().abs() > 1e-4].max()))
    return differing, total, max_ulp, max_away


def assert_left_nothing(out_dir: Path) -> None:
    """The out dir is absent or empty and no staging dir is left next to it."""
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.iterdir())
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert leftovers == []


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_fp32_merge_matches_peft(models: dict[str, Path], adapter: str, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = merge_lora(models["base32"], models[adapter], out)
    ref = peft_merged(models["base32"], models[adapter])
    ours = load_all(out)
    base = load_file(models["base32"] / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    targets = ADAPTERS[adapter].get("target_modules", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"))
    assert result["merged_tensors"] == len(targets) * LAYERS
    assert result["tensors"] == len(ref) and result["dtype"] == "float32"
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    print(f"{adapter}: max abs diff vs peft {worst:.3g}")
    assert worst <= 1e-6
    for key, tensor in ours.items():
        assert tensor.dtype == torch.float32
        adapted = any(f".{t}." in key for t in targets)
        changed = not torch.equal(tensor, base[key])
        assert changed == adapted, key  # adapted weights move, all others are bit-identical


def test_bf16_base_matches_peft_within_one_ulp(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = merge_lora(models["base16"], models["r8_a16"], out)
    ref = peft_merged(models["base16"], models["r8_a16"])
    ours = load_all(out)
    assert result["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    differing, total, max_ulp, max_ulp_away_from_zero = ulp_stats(ours, ref)
    print(f"bf16: {differing}/{total} elements differ from peft, max {max_ulp} ulp "
          f"({max_ulp_away_from_zero} ulp where |w| > 1e-4)")
    assert max_ulp_away_from_zero <= 1
    assert differing / total < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_conversion_equals_peft_cast(models: dict[str, Path], dtype: str, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = merge_lora(models["base32"], models["r8_a16"], out, dtype=dtype)
    target = getattr(torch, dtype)
    ref = {k: v.to(target) for k, v in peft_merged(models["base32"], models["r8_a16"]).items()}
    ours = load_all(out)
    assert result["dtype"] == dtype
    assert {t.dtype for t in ours.values()} == {target}
    differing, total, max_ulp, max_away = ulp_stats(ours, ref)
    print(f"fp32 -> {dtype}: {differing}/{total} elements differ from peft + cast, max {max_ulp} ulp "
          f"({max_away} where |w| > 1e-4)")
    assert max_away <= 1 and differing / total < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == target


def test_sharded_output_loads_and_equals_single_file(models: dict[str, Path], tmp_path: Path) -> None:
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    merge_lora(models["base32"], models["r8_a16"], single)
    result = merge_lora(models["base32"], models["r8_a16"], sharded, max_shard_bytes=1024**2)
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
    model = AutoModelForCausalLM.from_pretrained(sharded)
    state = model.state_dict()
    assert all(torch.equal(state[k], a[k]) for k in a)

    # A sharded base (written by our writer, with an index) merges to the same tensors.
    base = tmp_path / "base_sharded"
    shutil.copytree(models["base32"], base, ignore=shutil.ignore_patterns("*.safetensors"))
    infos = list_model_tensors(models["base32"])
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
    shutil.copytree(models["base32"], base)
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
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()


def test_cli_runs_without_torch(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code = (
        "import sys, json, resource; from include.merge import main; "
        f"rc = main(['--base', {str(models['base32'])!r}, '--adapter', {str(models['r8_a16'])!r}, "
        f"'--out', {str(out)!r}, '--dtype', 'bfloat16', '--max-shard-size', '2MB']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["dtype"] == "bfloat16" and result["merged_tensors"] == 14
    assert (out / INDEX_FILE).is_file()
    bad = subprocess.run([sys.executable, "-m", "include.merge", "--base", str(tmp_path / "nope"), "--adapter",
                          str(models["r8_a16"]), "--out", str(tmp_path / "o2")], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Fix:" in bad.stderr


# ---------------------------------------------------------------- validation: nothing is written on error


def _adapter_copy(models: dict[str, Path], tmp_path: Path, *, config: dict | None = None,
                  tensors: dict | None = None) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(models["r8_a16"], adapter)
    if config is not None:
        current = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**current, **config}))
    if tensors is not None:
        current = load_file(adapter / "adapter_model.safetensors")
        current.update(tensors)
        save_file({k: v for k, v in current.items() if v is not None}, adapter / "adapter_model.safetensors")
    return adapter


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
CASES = {
    "no_adapter_config": ("rm_config", None, r"no adapter_config\.json in .*Fix: point the source at a peft"),
    "no_adapter_weights": ("rm_weights", None, r"no adapter_model\.safetensors in"),
    "base_missing": ("base_missing", None, r"base model dir '.*nope' does not exist.*Fix: set base_model"),
    "base_without_weights": ("base_empty", None, r"no usable safetensors weights.*Fix: set base_model"),
    "loha": ({"peft_type": "LOHA"}, None, r"peft_type 'LOHA'; only LORA adapters are supported"),
    "dora": ({"use_dora": True}, None, r"uses DoRA \(use_dora = True\), which the streaming merge does not support"),
    "rank_pattern": ({"rank_pattern": {"q_proj": 4}}, None, r"per-module ranks .*not support yet"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, r"modules_to_save.*not support yet"),
    "lora_bias_tensor": (None, {f"{Q0}.lora_B.bias": torch.zeros(256)}, r"trained biases: tensor '.*lora_B\.bias'"),
    "embedding_lora": (None, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 1000)},
                       r"embedding LoRA"),
    "shape_mismatch": (None, {f"{Q0}.lora_B.weight": torch.ones(128, 8)},
                       r"module 'model\.layers\.0\.self_attn\.q_proj': the base weight has shape \[256, 256\], "
                       r"the adapter's B @ A gives \[128, 256\]"),
    "module_not_in_base": (None, {"base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.ones(8, 256),
                                  "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight": torch.ones(512, 8)},
                           r"adapts module 'model\.layers\.7\.mlp\.up_proj', but the base '.*base32' has no tensor"),
    "rank_disagrees": ({"r": 16}, None, r"do not have rank r=16"),
    "expected_base": ("expected", None, r"trained on base '.*base32'.*configured base model is "
                                        r"'meta-llama/Llama-3\.2-1B'.*Fix: set base_model"),
    "nan_in_adapter": (None, {f"{Q0}.lora_A.weight": torch.full((8, 256), float("nan"))},
                       r"merged tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has 65536 NaN and 0 Inf values"),
    "out_not_empty": ("out_full", None, r"output dir '.*' already exists and is not empty"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors_write_nothing(models: dict[str, Path], case: str, tmp_path: Path) -> None:
    change, tensors, pattern = CASES[case]
    base, out, expected = models["base32"], tmp_path / "out", None
    adapter = _adapter_copy(models, tmp_path, config=change if isinstance(change, dict) else None, tensors=tensors)
    if change == "rm_config":
        (adapter / "adapter_config.json").unlink()
    elif change == "rm_weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif change == "base_missing":
        base = tmp_path / "nope"
    elif change == "base_empty":
        base = tmp_path / "empty_base"
        base.mkdir()
        (base / "config.json").write_text("{}")
    elif change == "expected":
        expected = "meta-llama/Llama-3.2-1B"
    elif change == "out_full":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match=pattern):
        merge_lora(base, adapter, out, expected_base=expected)
    if change == "out_full":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert_left_nothing(out)


def test_overflow_to_float16_is_an_error(models: dict[str, Path], tmp_path: Path) -> None:
    big = {f"{Q0}.lora_B.weight": torch.full((256, 8), 1e3)}  # delta = 2 * 8 * 1e3 * 10 = 160000 > 65504
    adapter = _adapter_copy(models, tmp_path, tensors={f"{Q0}.lora_A.weight": torch.full((8, 256), 10.0), **big})
    merge_lora(models["base32"], adapter, tmp_path / "bf16", dtype="bfloat16")  # fits bfloat16's range
    with pytest.raises(MergeError, match=r"merged tensor '.*q_proj\.weight' has 65536 values beyond the float16 "
                                         r"range.*Fix: merge to bfloat16 or float32"):
        merge_lora(models["base32"], adapter, tmp_path / "fp16", dtype="float16")
    assert_left_nothing(tmp_path / "fp16")


def test_expected_base_match_by_name_merges(models: dict[str, Path], tmp_path: Path) -> None:
    result = merge_lora(models["base32"], models["r8_a16"], tmp_path / "m", expected_base="someone/BASE32")
    assert result["merged_tensors"] == 14


@pytest.mark.parametrize(
    ("recorded", "expected", "same"),
    [
        ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B", True),
        ("Qwen/Qwen2.5-7B/", "Qwen/Qwen2.5-7B", True),
        ("/models/Qwen2.5-7B", "Qwen/Qwen2.5-7B", True),
        ("unsloth/qwen2.5-7b-bnb-4bit", "Qwen/Qwen2.5-7B", True),
        ("unsloth/Qwen2.5-7B-unsloth-bnb-4bit", "Qwen/Qwen2.5-7B", True),
        ("/hf/hub/models--Qwen--Qwen2.5-7B/snapshots/0123abcd", "Qwen/Qwen2.5-7B", True),
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B", False),
        ("meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-7B", False),
        ("/hf/hub/models--Qwen--Qwen2.5-7B/snapshots/0123abcd", "Qwen/Qwen2.5-3B", False),
    ],
)
def test_same_base_rule(recorded: str, expected: str, same: bool) -> None:
    assert same_base(recorded, expected) is same


def test_bad_dtype(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MergeError, match=r"unknown merge dtype 'fp8'.*auto, float32, float16, bfloat16"):
        merge_lora(models["base32"], models["r8_a16"], tmp_path / "o", dtype="fp8")
    assert_left_nothing(tmp_path / "o")


def test_fan_in_fan_out_conv1d_and_small_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 keeps Conv1D weights as (in, out): peft's LoRA uses fan_in_fan_out there; tiny chunks force row blocks."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path / "gpt2", tmp_path / "gpt2_lora"
    gpt2 = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(gpt2).save_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(adapter_dir)
    monkeypatch.setattr("include.merge.CHUNK_BYTES", 1000)  # ~4 rows of 64 float32 per block
    result = merge_lora(base_dir, adapter_dir, tmp_path / "merged")
    assert result["merged_tensors"] == 3 * 2  # c_attn, attn.c_proj, mlp.c_proj per layer
    ref = peft_merged(base_dir, adapter_dir)
    ours = load_all(tmp_path / "merged")
    assert ours["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # (in, out)
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    print(f"gpt2 fan_in_fan_out: max abs diff vs peft {worst:.3g}")
    assert worst <= 1e-6
