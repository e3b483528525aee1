"""The Space template rendered into a directory and run: Gradio Blocks + real llama-cpp-python, no network."""

from __future__ import annotations

import importlib.util
import itertools
import re
import socket
import sys
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from include.hub.model_card import GRADIO_VERSION, space_files
from tests.gguf_helpers import tiny_gguf


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as Q8_0 (shared with test_gguf / test_health through the session's base temp dir)."""
    root = tmp_path_factory.getbasetemp() / "tiny-gguf"
    root.mkdir(exist_ok=True)
    return tiny_gguf(root, "Q8_0")


def render(tmp_path: Path) -> Path:
    """The Space's files as the Hub would hold them, written into ``tmp_path/space``."""
    space = tmp_path / "space"
    space.mkdir()
    for name, content in space_files(model="majora", model_repo="acme/majora-GGUF", hardware="cpu-basic").items():
        (space / name).write_bytes(content)
    return space


def import_app(space: Path) -> ModuleType:
    """Import the rendered app.py as a module, the way the Space's Python would run it."""
    spec = importlib.util.spec_from_file_location("rendered_space_app", space / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_rendered_space_has_pinned_requirements_and_front_matter(tmp_path):
    space = render(tmp_path)

    pins = [line for line in (space / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    assert pins and all(re.fullmatch(r"[\w.-]+==[\w.]+", line) for line in pins)
    meta = yaml.safe_load((space / "README.md").read_text().split("---")[1])
    assert (meta["sdk"], meta["sdk_version"], meta["app_file"]) == ("gradio", GRADIO_VERSION, "app.py")
    assert meta["suggested_hardware"] == "cpu-basic" and meta["models"] == ["acme/majora-GGUF"]


def test_rendered_app_builds_its_gradio_ui_and_answers_with_a_local_gguf(tmp_path, q8_gguf, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gradio as gr
    from llama_cpp import Llama

    app = import_app(render(tmp_path))
    settings = app.read_settings({"MODEL_PATH": str(q8_gguf), "SYSTEM_PROMPT": "Be brief.", "MAX_TOKENS": "8",
                                  "N_CTX": "256"})
    path = app.download_model(settings)  # MODEL_PATH: no download
    llm = Llama(model_path=path, n_ctx=settings.n_ctx, n_threads=2, verbose=False, seed=1)

    demo = app.build_app(llm, settings)
    assert isinstance(demo, gr.ChatInterface) and isinstance(demo, gr.Blocks)
    answers = list(demo.fn("Hello there", [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}]))
    assert answers and answers[-1].strip(), "the model produced no text"
    assert all(b.startswith(a) for a, b in itertools.pairwise(answers)), "the answer streams growing"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/config", timeout=30) as response:
            config = response.read().decode()
    finally:
        demo.close()
    assert f"local ({q8_gguf.name})" in config, "the served UI is the app's ChatInterface"


def test_app_without_model_path_needs_the_space_variables(tmp_path):
    app = import_app(render(tmp_path))

    with pytest.raises(RuntimeError, match="MODEL_REPO, MODEL_FILE"):
        app.read_settings({})
    with pytest.raises(RuntimeError, match="is not a file"):
        app.download_model(app.read_settings({"MODEL_PATH": str(tmp_path / "missing.gguf")}))
