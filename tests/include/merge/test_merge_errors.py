"""Merge validation (nothing written on error), the CLI, a SIGKILL half way, the backends, HF cache bases."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from include.config.sections import MergeSettings
from include.errors import MergeError
from include.merge.adapter import same_base
from include.merge.backends import choose_backend, cuda_status, merge_model
from include.merge.base_model import resolve_base_model
from include.merge.safetensors_io import INDEX_FILE
from include.merge.streaming import merge_lora
from tests.include.merge.test_merge_oracle import build_models
from tests.include.merge.test_safetensors_io import load_all

ROOT = Path(__file__).resolve().parents[3]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny models (see test_merge_oracle)."""
    return build_models(tmp_path_factory.getbasetemp() / "merge-models")


def assert_left_nothing(out_dir: Path) -> None:
    """The out dir is absent or empty and no staging dir is left next to it."""
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.iterdir())
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert leftovers == []


def _adapter_copy(models: dict[str, Path], tmp_path: Path, *, config: dict | None = None,
                  tensors: dict | None = None, source: str = "r8_a16") -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(models[source], adapter)
    if config is not None:
        current = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**current, **config}))
    if tensors is not None:
        current = load_file(adapter / "adapter_model.safetensors")
        current.update(tensors)
        save_file({k: v for k, v in current.items() if v is not None}, adapter / "adapter_model.safetensors")
    return adapter


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
O0 = "base_model.model.model.layers.0.self_attn.o_proj"
CASES = {
    "no_adapter_config": ("rm_config", None, r"no adapter_config\.json in .*Fix: point the source at a peft"),
    "no_adapter_weights": ("rm_weights", None, r"no adapter_model\.safetensors in"),
    "base_missing": ("base_missing", None, r"base model dir '.*nope' does not exist.*Fix: set base_model"),
    "base_without_weights": ("base_empty", None, r"no usable safetensors weights.*Fix: set base_model"),
    "loha": ({"peft_type": "LOHA"}, None, r"peft_type 'LOHA'; only LORA adapters are supported"),
    "ia3": ({"peft_type": "IA3"}, None, r"peft_type 'IA3'; only LORA adapters are supported"),
    "layer_replication": ({"layer_replication": [[0, 2]]}, None, r"uses layer replication .*not support"),
    "unknown_lora_tensor": (None, {f"{Q0}.lora_C.weight": torch.zeros(8, 256)}, r"'.*lora_C\.weight' is not a LoRA"),
    "lora_bias_without_base_bias": (None, {f"{O0}.lora_B.bias": torch.zeros(256)},
                                    r"lora_bias on '.*o_proj', whose base layer has no bias"),
    "replacement_shape": (None, {"base_model.model.lm_head.weight": torch.zeros(1001, 256)},
                          r"replaces 'lm_head\.weight' with shape \[1001, 256\], the base has \[1000, 256\]"),
    "shape_mismatch": (None, {f"{Q0}.lora_B.weight": torch.ones(128, 8)},
                       r"module 'model\.layers\.0\.self_attn\.q_proj': the base weight has shape \[256, 256\], "
                       r"the adapter's B @ A gives \[128, 256\]"),
    "module_not_in_base": (None, {"base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.ones(8, 256),
                                  "base_model.model.model.layers.7.mlp.up_proj.lora_B.weight": torch.ones(512, 8)},
                           r"changes 'model\.layers\.7\.mlp\.up_proj\.weight' .*but the base '.*llama32' has no"),
    "rank_disagrees": ({"r": 16}, None, r"do not have rank r=16"),
    "rank_pattern_disagrees": ({"rank_pattern": {"q_proj": 4}}, None, r"q_proj'.* do not have rank r=4"),
    "expected_base": ("expected", None, r"trained on base '.*llama32'.*configured base model is "
                                        r"'meta-llama/Llama-3\.2-1B'.*Fix: set base_model"),
    "nan_in_adapter": (None, {f"{Q0}.lora_A.weight": torch.full((8, 256), float("nan"))},
                       r"merged tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has 65536 NaN and 0 Inf values"),
    "inf_in_replacement": (None, {"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight":
                                  torch.full((256, 8), float("inf"))}, r"down_proj\.weight' has \d+ NaN and \d+ Inf"),
    "out_not_empty": ("out_full", None, r"output dir '.*' already exists and is not empty"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validation_errors_write_nothing(models: dict[str, Path], case: str, tmp_path: Path) -> None:
    change, tensors, pattern = CASES[case]
    base, out, expected = models["llama32"], tmp_path / "out", None
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


def test_tied_lm_head_lora_is_refused_clearly(models: dict[str, Path], tmp_path: Path) -> None:
    tensors = {"base_model.model.lm_head.lora_A.weight": torch.ones(8, 256),
               "base_model.model.lm_head.lora_B.weight": torch.ones(1000, 8)}
    adapter = _adapter_copy(models, tmp_path, tensors=tensors, source="gemma_tied_embedding")
    with pytest.raises(MergeError, match=r"lm_head is tied to the input embeddings.*target embed_tokens instead"):
        merge_lora(models["gemma32"], adapter, tmp_path / "out")
    assert_left_nothing(tmp_path / "out")


def test_overflow_to_float16_is_an_error(models: dict[str, Path], tmp_path: Path) -> None:
    big = {f"{Q0}.lora_B.weight": torch.full((256, 8), 1e3)}  # delta = 2 * 8 * 1e3 * 10 = 160000 > 65504
    adapter = _adapter_copy(models, tmp_path, tensors={f"{Q0}.lora_A.weight": torch.full((8, 256), 10.0), **big})
    merge_lora(models["llama32"], adapter, tmp_path / "bf16", dtype="bfloat16")  # fits bfloat16's range
    with pytest.raises(MergeError, match=r"merged tensor '.*q_proj\.weight' has 65536 values beyond the float16 "
                                         r"range.*Fix: merge to bfloat16 or float32"):
        merge_lora(models["llama32"], adapter, tmp_path / "fp16", dtype="float16")
    assert_left_nothing(tmp_path / "fp16")


def test_expected_base_match_by_name_merges(models: dict[str, Path], tmp_path: Path) -> None:
    result = merge_lora(models["llama32"], models["r8_a16"], tmp_path / "m", expected_base="someone/LLAMA32")
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
        merge_lora(models["llama32"], models["r8_a16"], tmp_path / "o", dtype="fp8")
    assert_left_nothing(tmp_path / "o")


def test_progress_lines(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("include.merge.streaming.PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="include.merge.streaming"):
        merge_lora(models["llama32"], models["r8_a16"], tmp_path / "m")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merge: ")]
    assert lines and all(" tensors, " in line and line.endswith(" MB/s") for line in lines)
    assert lines[-1].startswith("merge: 21/21 tensors")


def test_cli_runs_without_torch(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code = (
        "import sys, json; from include.cli.merge import main; "
        f"rc = main(['--base', {str(models['llama32'])!r}, '--adapter', {str(models['dora'])!r}, "
        f"'--out', {str(out)!r}, '--dtype', 'bfloat16', '--max-shard-size', '2MB']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["dtype"] == "bfloat16" and result["merged_tensors"] == 14 and result["backend"] == "streaming"
    assert (out / INDEX_FILE).is_file()
    bad = subprocess.run([sys.executable, "-m", "include.merge", "--base", str(tmp_path / "nope"), "--adapter",
                          str(models["r8_a16"]), "--out", str(tmp_path / "o2")], cwd=ROOT, capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Fix:" in bad.stderr


SLOW_MERGE = """
import sys, time
import include.merge.streaming, include.merge.arithmetic
from include.cli.merge import main
include.merge.arithmetic.BLOCK_BYTES = 8192
real = include.merge.streaming.output_jobs
def slow(*args):
    for chunk in real(*args):
        time.sleep(0.005)
        yield chunk
include.merge.streaming.output_jobs = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_half_way_leaves_nothing_complete_and_retry_succeeds(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    args = ["--base", str(models["llama32"]), "--adapter", str(models["r8_a16"]), "--out", str(out),
            "--max-shard-size", "1MB"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while sum(p.stat().st_size for p in tmp_path.glob(f".merged.merging-*-{proc.pid}-*/*")) < 2_000_000:
        assert proc.poll() is None and time.monotonic() < deadline, "merge ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    stage = next(tmp_path.glob(f".merged.merging-*-{proc.pid}-*"))
    assert not out.exists()  # nothing at the output path; the stage holds only hidden partial files
    assert any(p.name.endswith(".partial") for p in stage.iterdir())
    assert not any(p.name.endswith(".safetensors") for p in stage.iterdir())

    result = merge_lora(models["llama32"], models["r8_a16"], out, max_shard_bytes=1024**2)  # the retry
    assert not stage.exists()  # the dead merge's stage is cleaned up
    merge_lora(models["llama32"], models["r8_a16"], tmp_path / "clean", max_shard_bytes=1024**2)
    a, b = load_all(out), load_all(tmp_path / "clean")
    assert result["tensors"] == len(a) and all(torch.equal(a[k], b[k]) for k in b)


# ---------------------------------------------------------------- backends


def test_peft_backend_equals_streaming(models: dict[str, Path], tmp_path: Path) -> None:
    ref = merge_model(models["llama16"], models["r8_a16"], tmp_path / "s", backend="streaming")
    got = merge_model(models["llama16"], models["r8_a16"], tmp_path / "p", backend="peft", max_shard_bytes=1024**2)
    assert got["backend"] == "peft" and ref["backend"] == "streaming" and got["dtype"] == "bfloat16"
    assert {"config.json", "tokenizer.model", "generation_config.json", INDEX_FILE} <= set(got["files"])
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "bfloat16"
    a, b = load_all(tmp_path / "s"), load_all(tmp_path / "p")
    assert sorted(a) == sorted(b)
    differing = sum(int((a[k] != b[k]).sum()) for k in a)
    assert differing / sum(t.numel() for t in a.values()) < 1e-4  # peft's float32 rounding, see test_merge
    with pytest.raises(MergeError, match=r"peft_type 'LOHA'"):
        merge_model(models["llama16"], _adapter_copy(models, tmp_path, config={"peft_type": "LOHA"}),
                    tmp_path / "x", backend="peft")
    assert_left_nothing(tmp_path / "x")


def test_unsloth_backend_needs_cuda(models: dict[str, Path], tmp_path: Path) -> None:
    reason = cuda_status()
    if reason is None:
        pytest.skip("a CUDA GPU is present: the no-GPU refusal cannot be checked here")
    with pytest.raises(MergeError, match=r"unsloth merge backend needs a CUDA GPU, but torch\.cuda\.is_available"):
        merge_model(models["llama32"], models["r8_a16"], tmp_path / "u", backend="unsloth")
    assert_left_nothing(tmp_path / "u")


@pytest.mark.gpu
@pytest.mark.skipif(cuda_status() is not None, reason=f"unsloth merge needs CUDA: {cuda_status()}")
def test_unsloth_backend_merges_on_gpu(models: dict[str, Path], tmp_path: Path) -> None:  # pragma: no cover
    result = merge_model(models["llama16"], models["r8_a16"], tmp_path / "u", backend="unsloth")
    assert result["backend"] == "unsloth" and (tmp_path / "u" / "config.json").is_file()


def test_auto_backend_choice(models: dict[str, Path], tmp_path: Path) -> None:
    assert choose_backend("auto", models["dora"]) == "streaming"
    needs_peft = _adapter_copy(models, tmp_path, config={"layer_replication": [[0, 2]]})
    assert choose_backend("auto", needs_peft) == "peft"
    with pytest.raises(MergeError, match=r"unknown merge backend 'gpu'.*streaming, peft, unsloth, auto"):
        choose_backend("gpu", models["dora"])
    assert MergeSettings(backend="auto").backend == "auto" and MergeSettings().backend == "fused"
    assert MergeSettings(dtype="bfloat16").backend == "streaming"  # a dtype change needs a merged model
    with pytest.raises(ValueError, match="streaming"):
        MergeSettings(backend="gpu")  # type: ignore[arg-type]


def test_base_from_hugging_face_cache_offline(models: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A base in the huggingface_hub cache layout (blobs + symlinked snapshot + refs/main), resolved offline."""
    from huggingface_hub import constants

    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--Tiny-Llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, src in enumerate(sorted(models["llama32"].iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(src, blob)
        (snapshot / src.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = resolve_base_model("acme/Tiny-Llama")
    assert base == snapshot
    adapter = _adapter_copy(models, tmp_path, config={"base_model_name_or_path": "acme/Tiny-Llama"})
    result = merge_lora(base, adapter, tmp_path / "m", expected_base="acme/Tiny-Llama")
    assert result["merged_tensors"] == 14 and not (tmp_path / "m" / "tokenizer.model").is_symlink()
    with pytest.raises(MergeError, match=r"'acme/Other' is not in the local Hugging Face cache"):
        resolve_base_model("acme/Other")


def test_dtype_cast_of_odd_shapes(tmp_path: Path) -> None:
    """Unedited tensors of any rank (scalar, 3-D, empty) are cast to the output dtype exactly as torch casts."""
    from safetensors.torch import save_file as save

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {"w.weight": torch.randn(8, 4, generator=gen), "conv": torch.randn(3, 5, 7, generator=gen),
               "scalar": torch.tensor(1.5), "empty": torch.zeros(4, 0), "ids": torch.arange(6)}
    save(tensors, base / "model.safetensors")
    save({"base_model.model.w.lora_A.weight": torch.randn(2, 4, generator=gen),
          "base_model.model.w.lora_B.weight": torch.randn(8, 2, generator=gen)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    merge_lora(base, adapter, tmp_path / "out", dtype="bfloat16")
    got = load_all(tmp_path / "out")
    for name in ("conv", "scalar", "empty"):
        assert torch.equal(got[name], tensors[name].to(torch.bfloat16)), name
    assert torch.equal(got["ids"], tensors["ids"])  # integer tensors keep their dtype and bytes
