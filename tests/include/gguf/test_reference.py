"""The fidelity gate's layer-streamed HF reference against transformers' full model, and its memory bound.

The oracle is the full model, loaded the way the gate loaded it before (``from_pretrained`` in float32; for a
fused adapter, every edited tensor overwritten with :func:`include.merge.fused.merged_tensor`). Models are
generated (tests/fixtures/tiny_model.py) and cached by the generator's hash, like the demo's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from include.errors import GGUFError
from include.gguf.fidelity import compare_logits
from include.gguf.reference import streamed_logits
from include.merge.fused import check_fusable, merged_tensor
from include.store.hashing import sha256_file
from tests.fixtures.tiny_model import make_base_model, make_lora_adapter

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ("The model merges the adapter and deploys it.", "def f(x):\n    return x * 2", "12 + 30 = 42", "a")
TOLERANCE = 1e-4
MODELS = {  # name -> make_base_model arguments
    "llama-f32": {},
    "llama-tied-bf16": {"tie_word_embeddings": True, "dtype": "bfloat16", "seed": 4},
    "qwen2-bf16": {"arch": "qwen2", "dtype": "bfloat16", "seed": 5},
    "mistral-f16": {"arch": "mistral", "dtype": "float16", "seed": 6},
    "gemma": {"arch": "gemma", "seed": 7},
    # same width, different depth: the memory test (a layer is ~60 MB in float32)
    "deep-2": {"hidden_size": 1024, "intermediate_size": 4096, "layers": 2, "dtype": "bfloat16", "seed": 8},
    "deep-8": {"hidden_size": 1024, "intermediate_size": 4096, "layers": 8, "dtype": "bfloat16", "seed": 8},
}
ADAPTERS = {  # name -> (base, make_lora_adapter arguments)
    "all-linear": ("llama-f32", {}),
    "embed-lora-head-saved": ("llama-f32", {"target_modules": ("q_proj", "v_proj", "embed_tokens"),
                                            "modules_to_save": ["lm_head"], "seed": 2}),
    "tied-embed-lora": ("llama-tied-bf16", {"target_modules": ("down_proj", "embed_tokens"), "seed": 3}),
    "qwen2-all-linear": ("qwen2-bf16", {"seed": 4}),
}


def _cache() -> Path:
    key = sha256_file(ROOT / "tests" / "fixtures" / "tiny_model.py")[:12]
    return Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy")) / "test-models" / (
        f"reference-{key}")


def model(name: str) -> Path:
    """A generated base model (cached across sessions; read-only)."""
    out = _cache() / name
    if not (out / "config.json").is_file():
        make_base_model(out, **MODELS[name])
    return out


def adapter(name: str) -> tuple[Path, Path]:
    """``(base, adapter)`` of a generated LoRA adapter (cached across sessions; read-only)."""
    base_name, kwargs = ADAPTERS[name]
    base, out = model(base_name), _cache() / f"lora-{name}"
    if not (out / "adapter_config.json").is_file():
        make_lora_adapter(base, out, **kwargs)
    return base, out


def token_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [[int(t) for t in tokenizer(prompt)["input_ids"]] for prompt in PROMPTS]


def full_model_logits(model_dir: Path, ids: list[list[int]], fused_adapter: Path | None = None) -> list[np.ndarray]:
    """The oracle: the whole model in float32 (as the gate loaded it before), one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if fused_adapter is not None:
        edits, infos = check_fusable(model_dir, fused_adapter)
        state = full.state_dict()
        with torch.no_grad():
            for key, edit in edits.edits.items():
                state[key].copy_(merged_tensor(infos[key], edit).float())
    with torch.inference_mode():
        return [full(torch.tensor([t])).logits[0].double().numpy() for t in ids]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["llama-f32", "llama-tied-bf16", "qwen2-bf16", "mistral-f16"])
def test_streamed_reference_equals_the_full_model(name: str) -> None:
    base = model(name)
    ids = token_ids(base)
    expected = full_model_logits(base, ids)
    got = streamed_logits(base, ids)
    assert [g.shape for g in got] == [(len(t), 1000) for t in ids] and got[0].dtype == np.float64
    assert max_diff(got, expected) <= TOLERANCE
    # not vacuous: the logits vary by position and prompt
    assert float(np.abs(expected[0]).max()) > 0.5 and float(np.abs(expected[0][0] - expected[0][-1]).max()) > 0.1


def test_the_layer_by_layer_pass_logs_its_progress(monkeypatch, caplog) -> None:
    from include.gguf import reference

    base = model("llama-f32")
    monkeypatch.setattr(reference, "PROGRESS_S", 0.0)  # every layer: the tiny model runs in milliseconds
    with caplog.at_level("INFO", logger="include.gguf.reference"):
        streamed_logits(base, token_ids(base))
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    lines = [r.getMessage() for r in caplog.records if "layers in" in r.getMessage()]
    assert [line.split(" in ")[0] for line in lines] == [
        f"reference logits: {i} of {layers} layers" for i in range(1, layers)]


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_streamed_reference_merges_a_fused_adapter_like_the_full_model(name: str) -> None:
    base, lora = adapter(name)
    ids = token_ids(base)
    expected = full_model_logits(base, ids, fused_adapter=lora)
    got = streamed_logits(base, ids, fused_adapter=lora)
    assert max_diff(got, expected) <= TOLERANCE
    assert max_diff(got, streamed_logits(base, ids)) > 1e-3  # the adapter changes the logits


def test_the_gate_uses_the_streamed_reference_and_its_figures_match_the_full_model(tmp_path: Path) -> None:
    """compare_logits on the fused demo-style pair: the streamed figures are the full model's (f16 GGUF)."""
    from include.gguf.convert import convert_to_gguf
    from include.gguf.toolchain import pinned_toolchain
    from include.merge.streaming import merge_lora

    base, lora = adapter("all-linear")
    merged, f16 = tmp_path / "merged", tmp_path / "f16.gguf"
    merge_lora(base, lora, merged)
    convert_to_gguf(merged, f16, toolchain=pinned_toolchain(), outtype="f16")
    fused = compare_logits(base, f16, prompts=PROMPTS, max_abs_diff=1.0, max_kl=0.01, fused_adapter=lora)
    plain = compare_logits(merged, f16, prompts=PROMPTS, max_abs_diff=1.0, max_kl=0.01)
    assert fused["passed"] and plain["passed"] and fused["tokens"] == plain["tokens"] > 10
    assert abs(fused["max_abs_diff"] - plain["max_abs_diff"]) <= TOLERANCE
    # the full model's own figure on the same GGUF
    from include.gguf.fidelity import _llama

    ids = token_ids(merged)
    expected = full_model_logits(merged, ids)
    with _llama(f16, max(16, max(map(len, ids)))) as llm:
        worst = 0.0
        for tokens, ref in zip(ids, expected, strict=True):
            llm.reset()
            llm.eval(tokens)
            worst = max(worst, float(np.abs(np.array(llm.scores[: len(tokens)], dtype=np.float64) - ref).max()))
    assert abs(round(worst, 6) - plain["max_abs_diff"]) <= TOLERANCE


def _unsupported() -> Path:
    return model("gemma")


def _untied_without_head(tmp: Path) -> Path:
    out = tmp / "no-head"
    shutil.copytree(model("llama-tied-bf16"), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return out


@pytest.mark.parametrize(("make", "needles"), [
    (lambda tmp: _unsupported(), ["architecture 'GemmaForCausalLM' is not supported", "never loads a whole model"]),
    (_untied_without_head, ["has no tensor 'lm_head.weight'"]),
])
def test_what_the_streamed_reference_cannot_compute_fails_with_the_fix(make, needles: list[str],
                                                                       tmp_path: Path) -> None:
    model_dir = make(tmp_path)
    with pytest.raises(GGUFError) as caught:
        compare_logits(model_dir, tmp_path / "never-opened.gguf", prompts=["hello world"], max_abs_diff=1.0,
                       max_kl=0.01)
    for needle in needles:
        assert needle in str(caught.value)
    assert "fidelity.enabled: false" in caught.value.fix and "LlamaForCausalLM" in caught.value.fix


# The child computes the reference and exits; the parent samples the child's RssAnon from /proc/<pid>/status.
# RssAnon, not VmHWM/ru_maxrss: those count file-backed pages too (shared libraries, page cache of files read
# through mmap), which the kernel can drop; tracemalloc sees only Python's allocator, not torch's. Sampling
# from outside does not perturb the child. Sampling can miss a spike shorter than the period, but both
# models run the same code per layer, so a per-layer peak is sampled alike in both.
_CHILD = """
import sys
from include.gguf.reference import streamed_logits
mode, model_dir = sys.argv[1], sys.argv[2]
ids = [[1, 5, 9, 200, 17, 42, 999, 3, 3, 64] * 3, [1, 7, 8]]
if mode == "streamed":
    streamed_logits(model_dir, ids)
else:
    import torch
    from transformers import AutoModelForCausalLM
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        [full(torch.tensor([t])).logits for t in ids]
"""


def peak_rss_anon_mb(mode: str, model_dir: Path) -> float:
    """Peak RssAnon (MB) of a child computing the logits of two prompts (``streamed`` or ``full``)."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(model_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    ours = Path("/proc/self/cmdline").read_bytes()

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                # Until the child has exec'd it shares this (large) process's memory: not the child's own.
                if Path(f"/proc/{proc.pid}/cmdline").read_bytes() == ours:
                    time.sleep(0.002)
                    continue
                line = next(x for x in status.read_text().splitlines() if x.startswith("RssAnon:"))
            except (OSError, StopIteration):
                break
            peak = max(peak, int(line.split()[1]))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate(timeout=300)
    sampler.join()
    assert proc.returncode == 0, err.decode()[-3000:]
    return peak / 1024


def test_peak_memory_does_not_grow_with_the_number_of_layers() -> None:
    shallow, deep = model("deep-2"), model("deep-8")
    hidden, inter = 1024, 4096
    layer_mb = 4 * (2 * hidden * hidden + 2 * hidden * 512 + 3 * hidden * inter + 2 * hidden) / 2**20  # ~60 MB
    streamed_2, streamed_8 = peak_rss_anon_mb("streamed", shallow), peak_rss_anon_mb("streamed", deep)
    full_8 = peak_rss_anon_mb("full", deep)
    # 6 more layers cost the full model 6 layers; the streamed reference well under half of one
    assert full_8 - streamed_8 > 4 * layer_mb, (full_8, streamed_8)
    assert streamed_8 - streamed_2 < 0.5 * layer_mb, (streamed_2, streamed_8, layer_mb)


def quantized(name: str, quant: str) -> Path:
    """A generated model converted to f16 and quantized (cached next to the model)."""
    from include.gguf.convert import convert_to_gguf
    from include.gguf.quantize import quantize_gguf
    from include.gguf.toolchain import pinned_toolchain

    out = _cache() / f"{name}-{quant}.gguf"
    if not out.is_file():
        f16 = _cache() / f".{name}-f16.gguf"
        convert_to_gguf(model(name), f16, toolchain=pinned_toolchain(), outtype="f16")
        quantize_gguf(f16, out.with_suffix(".tmp"), quant)
        f16.unlink()
        out.with_suffix(".tmp").rename(out)
    return out


# Loads a GGUF in a fresh process (freed heap of earlier work in this one could hide an allocation) and prints
# how much its RssAnon grew: "gate" through the fidelity gate's loader, "default" through llama_cpp.Llama.
_LOAD = """
import sys
from pathlib import Path
def anon():
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith("RssAnon:")) / 1024
from llama_cpp import Llama
from include.gguf.fidelity import _llama
before = anon()
if sys.argv[1] == "gate":
    with _llama(Path(sys.argv[2]), 16) as llm:
        assert llm.model_params.use_extra_bufts is False
        print(anon() - before)
else:
    llm = Llama(model_path=sys.argv[2], n_ctx=16, verbose=False)
    print(anon() - before)
"""


def load_growth_mb(how: str, gguf: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _LOAD, how, str(gguf)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.split()[-1])


def test_llama_cpp_keeps_quantized_weights_in_the_mmaped_file() -> None:
    """The gate loads GGUFs with CPU weight repacking off: a Q4_K_M's weights are not copied to anonymous memory."""
    gguf = quantized("deep-8", "Q4_K_M")
    size_mb = gguf.stat().st_size / 2**20  # ~75 MB
    assert load_growth_mb("gate", gguf) < 0.25 * size_mb
    if "avx2" in Path("/proc/cpuinfo").read_text():  # llama.cpp repacks K-quants on AVX2 CPUs by default
        assert load_growth_mb("default", gguf) > 0.5 * size_mb
