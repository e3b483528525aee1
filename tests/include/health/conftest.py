"""Fixtures of the health tests: the tiny model's Q8_0 GGUF that the smoke servers serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gguf_helpers import tiny_gguf


@pytest.fixture(scope="session")
def q8_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as Q8_0 (1.8 MB; shared with test_gguf through the session's base temp dir)."""
    root = tmp_path_factory.getbasetemp() / "tiny-gguf"
    root.mkdir(exist_ok=True)
    return tiny_gguf(root, "Q8_0")
