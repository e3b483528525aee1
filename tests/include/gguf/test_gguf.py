"""Tests of include.gguf.convert with the real pinned llama.cpp converter and quantizer on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from include.errors import GGUFError
from include.gguf.convert import convert_to_gguf
from include.gguf.quantize import check_quant_used, known_quant_types, main_ggml_type, quantize_gguf
from include.gguf.reader import GGUFSummary, inspect_gguf
from include.gguf.toolchain import pinned_toolchain
from include.store.hashing import sha256_file
from tests.gguf_helpers import METADATA, tiny_gguf


def test_convert_f16_writes_a_complete_gguf_with_metadata(gguf_root: Path) -> None:
    path = tiny_gguf(gguf_root, "f16")
    summary = inspect_gguf(path)
    assert summary.architecture == "llama"
    assert summary.version == 3
    assert summary.tensor_count == 2 + 2 * 9 + 1  # embeddings, output, norm + 9 per layer
    assert summary.matrix_weights_by_type == {"F16": 1000 * 256 * 2 + 2 * (2 * 256 * 256 + 2 * 128 * 256
                                                                            + 3 * 256 * 512)}
    assert summary.weights_by_type["F32"] == 256 * 5  # norms stay F32
    assert 16.0 <= summary.bits_per_weight < 16.2
    assert summary.sha256 == sha256_file(path)
    assert summary.bytes == path.stat().st_size
    assert summary.file_type == 1
    for key, value in METADATA.items():
        assert summary.metadata[key] == value
    assert not [p.name for p in gguf_root.iterdir() if p.name.startswith(".")]  # no temp files left
    record = summary.as_record()
    assert json.loads(json.dumps(record)) == record
    assert "tensors" not in record


@pytest.mark.parametrize(("quant", "main", "bpw"), [("Q8_0", "Q8_0", (8.4, 8.7)), ("Q4_K_M", "Q4_K", (4.5, 6.0))])
def test_quantize_uses_the_requested_type(gguf_root: Path, quant: str, main: str, bpw: tuple[float, float]) -> None:
    path = tiny_gguf(gguf_root, quant)
    summary = inspect_gguf(path)
    fractions = summary.fractions()
    assert fractions[main] >= 0.5, fractions
    assert bpw[0] <= summary.bits_per_weight <= bpw[1], summary.bits_per_weight
    assert summary.file_type == known_quant_types()[quant]
    assert summary.metadata["general.name"] == METADATA["general.name"]  # metadata survives quantization
    check_quant_used(summary, quant)
    if quant == "Q4_K_M":
        assert set(fractions) <= {"Q4_K", "Q6_K"}, fractions  # Q6_K for output, some attn_v/ffn_down
        assert "Q6_K" in fractions
    else:
        assert fractions == {"Q8_0": 1.0}
    assert summary.bytes < inspect_gguf(tiny_gguf(gguf_root, "f16"), with_sha256=False).bytes * 0.6


def test_unknown_quant_type_lists_the_known_ones(gguf_root: Path, tmp_path: Path) -> None:
    with pytest.raises(GGUFError) as caught:
        quantize_gguf(tiny_gguf(gguf_root, "f16"), tmp_path / "out.gguf", "Q4_K_XL")
    message = str(caught.value)
    assert "'Q4_K_XL'" in message
    assert all(name in message for name in ("Q4_K_M", "Q5_K_M", "Q8_0", "F16"))
    assert not list(tmp_path.iterdir())


def test_known_quant_types_match_llama_ftype() -> None:
    known = known_quant_types()
    assert (known["Q8_0"], known["Q4_K_M"], known["Q5_K_M"], known["F16"], known["F32"]) == (7, 15, 17, 1, 0)


def test_non_gguf_and_truncated_files_are_rejected(gguf_root: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(GGUFError, match=r"not a GGUF file: magic b'PK\\x03\\x04'"):
        inspect_gguf(fake)
    with pytest.raises(GGUFError, match="not a GGUF"):
        quantize_gguf(fake, tmp_path / "q.gguf", "Q8_0")
    assert not (tmp_path / "q.gguf").exists()
    whole = tiny_gguf(gguf_root, "f16").read_bytes()
    for cut in (len(whole) - 1000, 2000):  # inside the tensor data, inside the header
        cut_file = tmp_path / f"cut-{cut}.gguf"
        cut_file.write_bytes(whole[:cut])
        with pytest.raises(GGUFError, match="truncated"):
            inspect_gguf(cut_file, with_sha256=False)


def test_checking_an_f16_file_as_q8_0_fails_with_the_numbers(gguf_root: Path) -> None:
    summary = inspect_gguf(tiny_gguf(gguf_root, "f16"), with_sha256=False)
    with pytest.raises(GGUFError, match=r"requested as 'Q8_0' but only 0\.0% .* are Q8_0.*F16 100\.0%"):
        check_quant_used(summary, "Q8_0")
    check_quant_used(summary, "F16")


def test_k_quant_fallback_on_narrow_rows_is_caught(gguf_root: Path) -> None:
    """Rows of 192 weights cannot be Q4_K: llama.cpp falls back silently, exits 0, and the check says so."""
    summary = inspect_gguf(tiny_gguf(gguf_root, "narrow-Q4_K_M"), with_sha256=False)
    assert "Q4_K" not in summary.matrix_weights_by_type
    with pytest.raises(GGUFError, match=r"requested as 'Q4_K_M' but only 0\.0% .* are Q4_K") as caught:
        check_quant_used(summary, "Q4_K_M")
    assert "multiples of 256" in str(caught.value)


def test_convert_failure_reports_converter_output(tmp_path: Path) -> None:
    model = tmp_path / "weird"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NopeForCausalLM"], "model_type": "nope"}))
    out = tmp_path / "out" / "weird.gguf"
    with pytest.raises(GGUFError) as caught:
        convert_to_gguf(model, out, toolchain=pinned_toolchain())
    message = str(caught.value)
    assert "exit code" in message and "NopeForCausalLM" in message
    assert not out.exists() and not list(out.parent.iterdir())


def test_convert_rejects_bad_inputs_before_running(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="'q4_k_m'"):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", toolchain=pinned_toolchain(), outtype="q4_k_m")
    with pytest.raises(GGUFError, match=r"no config\.json"):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", toolchain=pinned_toolchain())


@pytest.mark.parametrize(
    ("requested", "main"),
    [("Q4_K_M", "Q4_K"), ("q5_k_s", "Q5_K"), ("Q2_K", "Q2_K"), ("Q3_K_L", "Q3_K"), ("Q8_0", "Q8_0"),
     ("F16", "F16"), ("BF16", "BF16"), ("IQ4_XS", "IQ4_XS"), ("IQ2_XXS", "IQ2_XXS"), ("IQ3_M", "IQ3_S")],
)
def test_main_ggml_type(requested: str, main: str) -> None:
    assert main_ggml_type(requested) == main


def test_check_quant_used_threshold_is_on_matrix_weights() -> None:
    summary = GGUFSummary(path="x.gguf", bytes=1, sha256="", version=3, tensor_count=3, architecture="llama",
                          weights_by_type={"Q4_K": 600, "Q6_K": 400, "F32": 5000}, bits_per_weight=5.0,
                          matrix_weights_by_type={"Q4_K": 600, "Q6_K": 400})
    check_quant_used(summary, "Q4_K_M", min_fraction=0.6)  # 1-D F32 norms do not count
    with pytest.raises(GGUFError, match=r"60\.0%"):
        check_quant_used(summary, "Q4_K_M", min_fraction=0.7)


def test_inspect_cli_prints_json(gguf_root: Path) -> None:
    import subprocess
    import sys

    path = tiny_gguf(gguf_root, "f16")
    out = subprocess.run([sys.executable, "-m", "include.cli.gguf", "inspect", str(path)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[3]).stdout
    assert json.loads(out)["sha256"] == sha256_file(path)


def test_copy_of_gguf_is_identical(gguf_root: Path, tmp_path: Path) -> None:
    """inspect is about the bytes, not the name: a renamed copy summarises the same."""
    path = tiny_gguf(gguf_root, "Q8_0")
    copy = tmp_path / "renamed.bin"
    shutil.copyfile(path, copy)
    a, b = inspect_gguf(path).as_record(), inspect_gguf(copy).as_record()
    assert {**a, "path": ""} == {**b, "path": ""}


def test_a_crashing_quantizer_cannot_kill_the_caller(gguf_root: Path, tmp_path: Path) -> None:
    """The quantizer runs in a child: a native crash (here SIGKILL) becomes a GGUFError, no file is left."""
    crasher = tmp_path / "python-that-crashes"
    crasher.write_text("#!/bin/sh\necho 'GGML_ASSERT(false) failed'\nkill -9 $$\n")
    crasher.chmod(0o755)
    out = tmp_path / "out" / "q.gguf"
    with pytest.raises(GGUFError, match=r"killed by signal 9; last output:\nGGML_ASSERT\(false\) failed"):
        quantize_gguf(tiny_gguf(gguf_root, "f16"), out, "Q8_0", python=str(crasher))
    assert not list(out.parent.iterdir())
