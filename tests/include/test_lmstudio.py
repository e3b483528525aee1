"""Installing GGUFs into the LM Studio models tree."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from include.errors import InstallError
from include.hashing import sha256_file
from include.lmstudio import install_ggufs


def gguf_records(directory: Path, salt: bytes = b"") -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for quant in ("Q8_0", "Q4_K_M"):
        path = directory / f"model-{quant}.gguf"
        path.write_bytes(b"GGUF" + quant.encode() * 100 + salt)
        records.append({"quant": quant, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return records


def test_installs_at_the_depth_lm_studio_scans_as_hard_links(tmp_path):
    records = gguf_records(tmp_path / "store")
    result = install_ggufs(records, models_dir=tmp_path / "models", publisher="acme", repo="m-GGUF", model="m",
                           version="checkpoint-20")
    paths = [Path(item["path"]) for item in result["installed"]]
    assert [p.relative_to(tmp_path / "models").parts for p in paths] == [
        ("acme", "m-GGUF", "m-checkpoint-20-Q8_0.gguf"), ("acme", "m-GGUF", "m-checkpoint-20-Q4_K_M.gguf")]
    assert all(item["linked"] for item in result["installed"])
    assert os.stat(paths[0]).st_ino == os.stat(records[0]["path"]).st_ino
    assert result["installed"][1]["identifier"] == "acme/m-GGUF/m-checkpoint-20-Q4_K_M.gguf"
    assert not [p for p in paths[0].parent.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_new_version_keeps_the_previous_one_and_reinstall_is_idempotent(tmp_path):
    first = install_ggufs(gguf_records(tmp_path / "v1"), models_dir=tmp_path / "models", publisher="p", repo="r",
                          model="m", version="checkpoint-10")
    second = install_ggufs(gguf_records(tmp_path / "v2", b"2"), models_dir=tmp_path / "models", publisher="p",
                           repo="r", model="m", version="checkpoint-20")
    assert sorted(second["other_versions"]) == sorted(item["path"] for item in first["installed"])
    again = install_ggufs(gguf_records(tmp_path / "v2", b"2"), models_dir=tmp_path / "models", publisher="p",
                          repo="r", model="m", version="checkpoint-20")
    assert [i["sha256"] for i in again["installed"]] == [i["sha256"] for i in second["installed"]]
    assert len(list((tmp_path / "models" / "p" / "r").glob("*.gguf"))) == 4


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem (/dev/shm) to force a copy")
def test_copies_atomically_across_filesystems(tmp_path):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        records = gguf_records(Path(other) / "store")
        result = install_ggufs(records, models_dir=tmp_path / "models", publisher="p", repo="r", model="m",
                               version="v1")
    assert not any(item["linked"] for item in result["installed"])
    assert sha256_file(Path(result["installed"][0]["path"])) == records[0]["sha256"]


def test_unwritable_models_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InstallError, match=r"lmstudio\.models_dir"):
        install_ggufs(gguf_records(tmp_path / "s"), models_dir=blocker, publisher="p", repo="r", model="m",
                      version="v1")
