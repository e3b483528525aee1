"""The fidelity gate with real models: transformers on the merged tiny model vs llama.cpp on its GGUFs.

The tiny model's figures (and the 0.5B bench model's, see docs/fidelity.md) stay within the default
thresholds, so most tests use the defaults; tests of failures pass explicit thresholds only where the
default would hide what is tested.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from include.config.loader import validate_model
from include.config.sections import DEFAULT_MAX_PPL_RATIO, FidelitySettings
from include.errors import ConfigError, GGUFError
from include.gguf.convert import convert_to_gguf
from include.gguf.fidelity import (
    check_perplexity,
    compare_logits,
    default_eval_text,
    evaluation_text,
    fidelity_settings,
    max_ratio_for,
    perplexity,
)
from include.gguf.quantize import quantize_gguf
from include.gguf.toolchain import pinned_toolchain
from include.merge.streaming import merge_lora

ROOT = Path(__file__).resolve().parents[3]
QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")

# Rewrites one tensor's data in place through the pinned gguf-py (memory-mapped read/write).
_CORRUPT = """
import sys
import numpy as np
from gguf import GGUFReader
path, name, factor = sys.argv[1], sys.argv[2], float(sys.argv[3])
reader = GGUFReader(path, "r+")
tensor = next(t for t in reader.tensors if t.name == name)
data = tensor.data
data[...] = (data.astype(np.float32) * factor).astype(data.dtype)
data.flush() if hasattr(data, "flush") else None
print(tensor.tensor_type.name, tensor.n_elements)
"""


def corrupt_tensor(path: Path, name: str, factor: float) -> str:
    """Multiply the values of tensor ``name`` of an F16/F32 GGUF by ``factor``, in place; its ggml type."""
    env = {**os.environ, "PYTHONPATH": str(pinned_toolchain().gguf_py)}
    out = subprocess.run([sys.executable, "-c", _CORRUPT, str(path), name, str(factor)], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.split()[0]


TRAIN_STEPS, TRAIN_BATCH, TRAIN_LEN = 60, 4, 96


def trained_base(base: Path) -> Path:
    """The demo base fine-tuned for a few steps on the built-in eval text (cached across sessions).

    A random model's distributions are flat, so quantization noise moves its perplexity at random; a
    model that has learned the text has a low f16 perplexity that every quant can only worsen, like a
    real model. Deterministic (seeded, CPU); written to a temp dir and renamed.
    """
    from include.store.hashing import sha256_file

    key = sha256_file(base / "model.safetensors")[:12]
    cache = Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy"))
    out = cache / "test-models" / f"fidelity-trained-{key}-{TRAIN_STEPS}x{TRAIN_BATCH}x{TRAIN_LEN}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor(tokenizer(default_eval_text())["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(ids) - TRAIN_LEN - 1, (TRAIN_BATCH,), generator=generator)
        batch = torch.stack([ids[s:s + TRAIN_LEN] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for file in base.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copyfile(file, tmp / file.name)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def fidelity_models(demo_inputs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny base merged with the demo's checkpoint-20, its f16 GGUF and Q8_0/Q4_K_M/Q2_K quants."""
    root = tmp_path_factory.mktemp("fidelity")
    merged = root / "merged"
    merge_lora(trained_base(demo_inputs.base), demo_inputs.training_box / "checkpoint-20", merged)
    models = {"merged": merged, "f16": root / "f16.gguf"}
    convert_to_gguf(merged, models["f16"], toolchain=pinned_toolchain(), outtype="f16")
    for quant in QUANTS:
        models[quant] = root / f"{quant}.gguf"
        quantize_gguf(models["f16"], models[quant], quant)
    return models


@pytest.fixture(scope="session")
def defaults() -> FidelitySettings:
    """The default fidelity settings (built-in prompts, eval text and thresholds)."""
    config = fidelity_settings({})
    assert config is not None
    return config


def test_merged_model_matches_its_f16_gguf_within_defaults(fidelity_models, defaults: FidelitySettings) -> None:
    record = compare_logits(fidelity_models["merged"], fidelity_models["f16"], prompts=defaults.prompts,
                            max_abs_diff=defaults.max_abs_logit_diff, max_kl=defaults.max_kl)
    assert record["passed"] is True
    assert 0 < record["max_abs_diff"] < 0.05
    assert 0 <= record["mean_kl"] <= record["max_kl"] < 1e-4
    assert record["prompts"] == len(defaults.prompts) == 4
    assert record["tokens"] > 4 * 3
    assert record["worst_prompt"] in defaults.prompts


def test_a_corrupted_tensor_fails_the_gate_with_the_figures(fidelity_models, defaults: FidelitySettings,
                                                            tmp_path: Path) -> None:
    broken = tmp_path / "broken-f16.gguf"
    shutil.copyfile(fidelity_models["f16"], broken)
    assert corrupt_tensor(broken, "blk.1.ffn_down.weight", -6.0) == "F16"
    with pytest.raises(GGUFError) as caught:
        compare_logits(fidelity_models["merged"], broken, prompts=defaults.prompts,
                       max_abs_diff=defaults.max_abs_logit_diff, max_kl=defaults.max_kl)
    message = str(caught.value)
    assert "does not compute what the merged model computes" in message
    assert "fidelity.max_abs_logit_diff=1" in message and "fidelity.max_kl=0.01" in message
    assert "max |logit diff|" in message and "worst prompt" in message
    assert "Fix: a tensor was converted wrongly" in message
    assert caught.value.retryable is False
    # warn mode: the same figures come back with passed False instead of an exception
    record = compare_logits(fidelity_models["merged"], broken, prompts=defaults.prompts[:1],
                            max_abs_diff=defaults.max_abs_logit_diff, max_kl=defaults.max_kl, mode="warn")
    assert record["passed"] is False
    assert record["max_abs_diff"] > defaults.max_abs_logit_diff or record["max_kl"] > defaults.max_kl


def test_a_gguf_of_another_model_is_refused(fidelity_models, demo_inputs, tmp_path: Path) -> None:
    other = tmp_path / "other"
    from tests.fixtures.tiny_model import make_base_model

    make_base_model(other, hidden_size=192, intermediate_size=384, seed=3)
    with pytest.raises(GGUFError):
        compare_logits(other, fidelity_models["f16"], prompts=["hello world"], max_abs_diff=1.0, max_kl=0.01)


def test_perplexity_orders_the_quants_and_passes_the_defaults(fidelity_models, defaults: FidelitySettings) -> None:
    text = evaluation_text(defaults).text
    ppl = {kind: perplexity(fidelity_models[kind], text, n_ctx=defaults.n_ctx) for kind in ("f16", *QUANTS)}
    assert 1 < ppl["f16"] < 50  # the model has learned the text (a random one scores ~1000)
    assert abs(ppl["Q8_0"] / ppl["f16"] - 1) < 0.01
    assert ppl["Q4_K_M"] > ppl["Q8_0"] and ppl["Q2_K"] > ppl["Q4_K_M"]
    for quant in ("Q8_0", "Q4_K_M"):
        record = check_perplexity(quant, ppl[quant], ppl["f16"], max_ratio=max_ratio_for(defaults, quant))
        assert record["passed"] is True and record["ratio"] <= record["max_ratio"]
    # deterministic: the same file and text give the same figure to the last bit
    assert perplexity(fidelity_models["Q8_0"], text, n_ctx=defaults.n_ctx) == ppl["Q8_0"]


def test_perplexity_depends_on_the_chunk_length(fidelity_models, defaults: FidelitySettings) -> None:
    short = perplexity(fidelity_models["f16"], evaluation_text(defaults).text, n_ctx=32)
    long = perplexity(fidelity_models["f16"], evaluation_text(defaults).text, n_ctx=256)
    assert short != long and short > 1 and long > 1


def test_a_long_perplexity_run_logs_its_progress(fidelity_models, defaults: FidelitySettings, monkeypatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from include.gguf import fidelity

    monkeypatch.setattr(fidelity, "PROGRESS_S", 0.0)  # a line before every chunk
    with caplog.at_level("INFO", logger="include.gguf.fidelity"):
        quiet = perplexity(fidelity_models["f16"], evaluation_text(defaults).text, n_ctx=32)
    lines = [r.getMessage() for r in caplog.records if " tokens in " in r.getMessage()]
    assert len(lines) > 3 and lines[0].startswith("perplexity of ") and " 0 of " in lines[0]
    assert quiet == perplexity(fidelity_models["f16"], evaluation_text(defaults).text, n_ctx=32)  # same figure


def test_check_perplexity_raises_with_the_quant_figures_key_and_fix(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(GGUFError) as caught:
        check_perplexity("Q2_K", 13.5, 10.0, max_ratio=1.2)
    message = str(caught.value)
    assert "Q2_K is too far from f16" in message
    assert "13.5000" in message and "10.0000" in message and "1.3500" in message
    assert "fidelity.max_ppl_ratio.Q2_K=1.2" in message
    assert "Fix: use a larger quant type than Q2_K" in message
    with caplog.at_level(logging.WARNING, logger="include.gguf.fidelity"):
        record = check_perplexity("Q2_K", 13.5, 10.0, max_ratio=1.2, mode="warn")
    assert record == {"quant": "Q2_K", "ppl": 13.5, "ppl_f16": 10.0, "ratio": 1.35, "max_ratio": 1.2,
                      "passed": False}
    assert "fidelity.mode=warn" in caplog.text
    with pytest.raises(GGUFError, match="not a positive number"):
        check_perplexity("Q4_0", float("nan"), 10.0, max_ratio=1.2)
    assert check_perplexity("Q8_0", 10.1, 10.0, max_ratio=1.02)["passed"] is True


def test_settings_defaults_and_the_built_in_eval_text() -> None:
    config = fidelity_settings(None)
    assert config is None
    assert fidelity_settings({"enabled": False}) is None
    config = fidelity_settings(FidelitySettings())
    assert config is not None and config.mode == "fail"
    text = evaluation_text(config)
    assert text.text == default_eval_text() and len(text.text.split()) > 300
    assert text.source.startswith("built-in")
    assert max_ratio_for(config, "Q8_0") == 1.02
    assert max_ratio_for(config, "q4_k_m") == 1.10
    assert max_ratio_for(config, "TQ1_0") == DEFAULT_MAX_PPL_RATIO["default"]


def test_settings_merge_user_ratios_and_read_the_eval_file(tmp_path: Path) -> None:
    text = tmp_path / "eval.txt"
    text.write_text("word " * 50)
    config = fidelity_settings({"max_ppl_ratio": {"q4_k_m": 1.3, "DEFAULT": 2}, "eval_file": str(text),
                                "mode": "warn"})
    assert config is not None
    assert max_ratio_for(config, "Q4_K_M") == 1.3
    assert max_ratio_for(config, "Q8_0") == 1.02  # built-in entries stay
    assert max_ratio_for(config, "IQ9_X") == 2.0
    assert evaluation_text(config).text == "word " * 50 and config.mode == "warn"
    with pytest.raises(GGUFError, match=r"cannot read fidelity\.eval_file") as caught:
        evaluation_text(fidelity_settings({"eval_file": str(tmp_path / "missing.txt")}))
    assert "built-in text" in caught.value.fix


@pytest.mark.parametrize(("fidelity", "needle"), [
    ({"max_ppl_ratio": {"Q4_K_M": 0.9}}, "a quant cannot beat f16"),
    ({"max_ppl_ratio": {"Q4-K": 1.1}}, "is not a quantization type name"),
    ({"eval_text": "a b c"}, "too short"),
    ({"eval_text": "word " * 30, "eval_file": "/tmp/x.txt"}, "not both"),
    ({"prompts": []}, "at least 1 item"),
    ({"prompts": ["ok", "  "]}, "non-empty"),
    ({"mode": "ignore"}, "'fail' or 'warn'"),
    ({"max_kl": 0}, "greater than 0"),
    ({"n_ctx": 8}, "greater than or equal to 16"),
    ({"max_abs_diff": 1}, "Extra inputs"),
])
def test_settings_validation_names_the_field_and_fix(demo_inputs, fidelity: dict, needle: str) -> None:
    entry = {"base_model": str(demo_inputs.base), "source": {"kind": "local", "path": "/tmp"}, "fidelity": fidelity}
    with pytest.raises(ConfigError) as caught:
        validate_model("m1", entry)
    assert "models.m1.fidelity" in str(caught.value)
    assert needle in str(caught.value)
    with pytest.raises(GGUFError, match="invalid fidelity settings"):
        fidelity_settings(fidelity)


def test_bench_quick_mode_runs_end_to_end(demo_inputs, tmp_path: Path) -> None:
    out = tmp_path / "gguf.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gguf" / "run.py"), "--quick", "--out", str(out),
                           "--scratch", str(tmp_path / "scratch")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - started < 280  # ~20 s on an idle 2-core machine
    import json

    record = json.loads(out.read_text())
    assert isinstance(record["overhead_vs_raw"], float)
    assert record["quick"] is True
    assert set(record["cases"]) >= {"raw", "engine", "fused"}
    assert record["fused_ratio_vs_convert"] > 0
    assert record["cases"]["raw"]["wall_s"] > 0 and record["cases"]["engine"]["rss_mb"] > 0

