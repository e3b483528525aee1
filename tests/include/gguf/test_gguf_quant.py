"""llama-quantize / llama-imatrix built from the pinned sources: fallback trap, IQ types, overrides, determinism."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from include.config.sections import QuantizeSettings
from include.errors import GGUFError
from include.gguf import imatrix
from include.gguf.convert import convert_to_gguf
from include.gguf.metadata import disk_preflight, gguf_metadata
from include.gguf.quantize import check_quant_used, quantize_gguf
from include.gguf.reader import GGUFSummary
from include.gguf.toolchain import PINNED_VERSION, ensure_tools, pinned_toolchain, user_toolchain
from include.store.hashing import sha256_file
from tests.fixtures.tiny_model import make_base_model
from tests.gguf_helpers import tiny_gguf


@pytest.fixture(scope="session")
def tools() -> Path:
    """The pinned llama-quantize and llama-imatrix (built by `python -m include.cli.toolchain ensure`)."""
    return ensure_tools()


@pytest.fixture(scope="session")
def calib_imatrix(gguf_root: Path, tools: Path) -> Path:
    """An importance matrix of the tiny f16 from the built-in calibration text."""
    path = gguf_root / "imatrix.gguf"
    if not path.is_file():
        imatrix.compute_imatrix(pinned_toolchain(), tiny_gguf(gguf_root, "f16"), imatrix.BUILTIN_CALIBRATION, path)
    return path


def test_tools_are_built_once_from_the_pinned_sources(tools: Path) -> None:
    toolchain = pinned_toolchain()
    assert toolchain.tool("llama-quantize") == tools / "llama-quantize"
    assert toolchain.tool("llama-imatrix") == tools / "llama-imatrix"
    assert ensure_tools() == tools  # idempotent: the stamp makes the second call instant
    assert toolchain.version == PINNED_VERSION and "0.3.36" in PINNED_VERSION


def test_user_toolchain_dirs_replace_the_pinned_ones(tmp_path: Path, tools: Path) -> None:
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "llama-quantize").symlink_to(tools / "llama-quantize")
    own = user_toolchain(None, str(bins))
    assert own.tool("llama-quantize") == bins / "llama-quantize" and own.tool("llama-imatrix") is None
    assert str(bins) in own.version
    src = user_toolchain(str(pinned_toolchain().source_dir), None)
    assert src.converter == pinned_toolchain().converter and "llama.cpp checkout" in src.version
    with pytest.raises(GGUFError, match="llama-imatrix is not available"):
        imatrix.compute_imatrix(own, tmp_path / "x.gguf", "text", tmp_path / "m.gguf")


def test_k_quant_fallback_on_narrow_rows_fails_and_warn_mode_keeps_it(
        gguf_root: Path, tools: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    narrow = tiny_gguf(gguf_root, "narrow-f16")  # hidden 192: rows are not multiples of 256
    summary = quantize_gguf(narrow, tmp_path / "q4km.gguf", "Q4_K_M", toolchain=pinned_toolchain())
    assert summary.fractions().get("Q4_K", 0) < 0.5  # llama.cpp fell back and still exited 0
    with pytest.raises(GGUFError) as caught:
        check_quant_used(summary, "Q4_K_M")
    message = str(caught.value)
    assert "only" in message and "Q4_K" in message and "multiples of 256" in message and "on_fallback" in message
    with caplog.at_level(logging.WARNING, logger="include.gguf.quantize"):
        fraction = check_quant_used(summary, "Q4_K_M", on_fallback="warn")
    assert fraction < 0.5
    assert "quantize.on_fallback=warn" in caplog.text


@pytest.mark.parametrize(("quant", "main"), [("IQ4_XS", "IQ4_XS"), ("IQ2_XS", "IQ2_XS"), ("IQ3_M", "IQ3_S")])
def test_iq_types_with_an_imatrix(gguf_root: Path, calib_imatrix: Path, tmp_path: Path, quant: str,
                                  main: str) -> None:
    summary = quantize_gguf(tiny_gguf(gguf_root, "f16"), tmp_path / f"{quant}.gguf", quant,
                                 toolchain=pinned_toolchain(), imatrix=calib_imatrix)
    assert check_quant_used(summary, quant) >= 0.5
    assert summary.fractions()[main] >= 0.5


def test_iq_without_calibration_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="need an importance matrix"):
        QuantizeSettings(types=["Q8_0", "IQ2_XS"])
    assert QuantizeSettings(types=["IQ2_XS"], imatrix={"use_builtin_text": True}).imatrix.configured


def test_legacy_type_and_tensor_overrides_are_visible(gguf_root: Path, tools: Path, tmp_path: Path) -> None:
    summary = quantize_gguf(tiny_gguf(gguf_root, "f16"), tmp_path / "q5.gguf", "Q5_0",
                                 toolchain=pinned_toolchain(), output_tensor_type="Q8_0",
                                 token_embedding_type="Q4_0", extra_kv={"lora_deploy.quant_type": "Q5_0"})
    types = {t.name: t.ggml_type for t in summary.tensors}
    assert types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.attn_q.weight"] == "Q5_0"
    assert summary.metadata["lora_deploy.quant_type"] == "Q5_0"
    check_quant_used(summary, "Q5_0")


def test_reruns_are_byte_identical(gguf_root: Path, calib_imatrix: Path, tmp_path: Path) -> None:
    base = gguf_root / "tiny-base"
    tiny_gguf(gguf_root, "f16")
    shas = []
    for run in ("a", "b"):
        f16 = convert_to_gguf(base, tmp_path / run / "f16.gguf", toolchain=pinned_toolchain(),
                                   metadata={"general.name": "det"})
        q = quantize_gguf(f16.path, tmp_path / run / "q4.gguf", "Q4_K_M", toolchain=pinned_toolchain(),
                               imatrix=calib_imatrix)
        m = imatrix.compute_imatrix(pinned_toolchain(), Path(f16.path), imatrix.BUILTIN_CALIBRATION,
                                    tmp_path / run / "imatrix.gguf")
        shas.append((f16.sha256, q.sha256, sha256_file(m)))
    assert shas[0] == shas[1]


def test_disk_preflight_fails_early_with_the_numbers(gguf_root: Path, tmp_path: Path) -> None:
    base = gguf_root / "tiny-base"
    tiny_gguf(gguf_root, "f16")
    figures = disk_preflight(base, tmp_path, ["Q8_0", "Q4_K_M"])
    assert figures["weights"] == 1000 * 256 * 2 + 256 * 5 + 2 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 512)
    with pytest.raises(GGUFError) as caught:
        disk_preflight(base, tmp_path, ["Q8_0", "Q4_K_M"], free_bytes=1_000_000)
    message = str(caught.value)
    assert "not enough disk space" in message and "F16" in message and "Q4_K_M" in message
    assert "only 1.0 MB are free" in message


def test_metadata_names_model_version_base_and_toolchain(tmp_path: Path, gguf_root: Path) -> None:
    meta = gguf_metadata("demo", {"path": str(gguf_root / "tiny-base"), "adapter_version": "ckpt-20",
                                       "base_model": "org/tiny"}, {}, PINNED_VERSION)
    tiny_gguf(gguf_root, "f16")
    summary = convert_to_gguf(gguf_root / "tiny-base", tmp_path / "m.gguf", toolchain=pinned_toolchain(),
                                   metadata=meta)
    md = summary.metadata
    assert md["general.name"] == "demo" and md["general.version"] == "ckpt-20"
    assert md["general.base_model.count"] == 1 and md["general.base_model.0.name"] == "org/tiny"
    assert PINNED_VERSION in md["general.quantized_by"]


def test_metadata_names_the_base_model_publicly_never_by_a_local_path(tmp_path: Path) -> None:
    base = tmp_path / "models" / "Qwen2.5-7B-Instruct"
    base.mkdir(parents=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()

    def named(config: dict, adapter_config: dict, merged_path: Path = base) -> str:
        (base / "config.json").write_text(json.dumps(config))
        (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
        meta = gguf_metadata("m", {"path": str(merged_path), "base_model": str(base), "adapter_version": "v"},
                             {"path": str(adapter)}, PINNED_VERSION)
        assert str(tmp_path) not in json.dumps(meta)  # this machine's paths never leave it
        return meta["general.base_models"][0]["name"]

    assert named({"_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}, {}) == "Qwen/Qwen2.5-7B-Instruct"
    assert named({"_name_or_path": str(base)}, {"base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}) == \
        "Qwen/Qwen2.5-7B-Instruct"
    assert named({"_name_or_path": str(base)}, {"base_model_name_or_path": str(base)}) == "Qwen2.5-7B-Instruct"
    # a streaming merge's output dir (a store key) names the base as the fused path does: the same GGUF metadata
    merged = tmp_path / "artifacts" / "m" / "merged" / "0123abcd"
    merged.mkdir(parents=True)
    assert named({"_name_or_path": str(base)}, {}, merged_path=merged) == "Qwen2.5-7B-Instruct"
    hub = gguf_metadata("m", {"path": str(base), "base_model": "org/tiny"}, {}, PINNED_VERSION)
    assert hub["general.base_models"] == [{"name": "org/tiny"}] and "into org/tiny;" in hub["general.description"]


def test_narrow_model_dims_are_accepted(tmp_path: Path) -> None:
    make_base_model(tmp_path / "m", hidden_size=96, intermediate_size=192)
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_split_output_converts_and_quantizes_shard_by_shard(gguf_root: Path, tools: Path, tmp_path: Path) -> None:
    tiny_gguf(gguf_root, "f16")
    f16 = convert_to_gguf(gguf_root / "tiny-base", tmp_path / "m-F16.gguf", toolchain=pinned_toolchain(),
                               split_max_size="1M")
    names = sorted(p.name for p in tmp_path.iterdir())
    count = len(f16.shards)
    assert count >= 3 and names == [f"m-F16-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert f16.path == str(tmp_path / names[0]) and f16.tensor_count == 21
    assert f16.bytes == sum(s["bytes"] for s in f16.shards)
    whole = inspect_split_of(tiny_gguf(gguf_root, "f16"))
    assert f16.weights_by_type == whole.weights_by_type
    q8 = quantize_gguf(Path(f16.path), tmp_path / "m-Q8_0.gguf", "Q8_0", toolchain=pinned_toolchain(),
                            keep_split=True)
    assert len(q8.shards) == count and q8.tensor_count == 21
    check_quant_used(q8, "Q8_0")
    with pytest.raises(GGUFError, match="cannot use a temp file and split"):
        convert_to_gguf(gguf_root / "tiny-base", tmp_path / "x.gguf", toolchain=pinned_toolchain(),
                             split_max_size="1M", use_temp_file=True)


def inspect_split_of(path: Path) -> GGUFSummary:
    """The reader's view of a single-file GGUF (a split of one)."""
    from include.gguf.reader import inspect_split

    return inspect_split(path)


def test_split_and_temp_file_are_exclusive_in_config() -> None:
    with pytest.raises(ValueError, match="cannot be combined"):
        QuantizeSettings(split_max_size="2G", use_temp_file=True)
    with pytest.raises(ValueError, match="split_max_size"):
        QuantizeSettings(split_max_size="2 GB")
