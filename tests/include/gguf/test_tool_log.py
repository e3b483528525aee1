"""Tool output and llama.cpp's own log lines reach the task log at their real level; progress bars as progress."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from include.gguf import llama_log
from include.gguf.tool_log import classify
from include.gguf.tools import run_streaming
from tests.gguf_helpers import tiny_gguf


@pytest.mark.parametrize(("line", "level", "text"), [
    ("INFO:hf-to-gguf:Loading model: base", logging.INFO, "INFO:hf-to-gguf:Loading model: base"),
    ("WARNING:hf-to-gguf:Unknown RoPE type: default", logging.INFO, None),  # expected: a notice
    ("WARNING:gguf.vocab:Adding merges requested but no merges found", logging.WARNING, None),
    ("ERROR:hf-to-gguf:Model MambaForCausalLM is not supported", logging.ERROR, None),
    ("Traceback (most recent call last):", logging.ERROR, None),
    ("llama_model_quantize: failed to quantize: tensor 'blk.0' has wrong shape", logging.ERROR, None),
    ("main: error: unable to load model", logging.ERROR, None),
    ("llama_context: n_ctx_seq (512) > n_ctx_train (0) -- possible training context overflow", logging.INFO, None),
    ("[  12/ 255]  blk.0.attn_k.weight - [ 3584,   512,     1,     1], type =   bf16, converting to q4_K .. "
     "size =     3.50 MiB ->     0.98 MiB", logging.INFO, None),
    ("WARNING: 96 of 169 tensor(s) required fallback quantization", logging.WARNING, None),
    ("Writing:  47%|████▋     | 7.09G/15.2G [00:45<00:39, 207Mbyte/s]", logging.INFO,
     "Writing: 7.09G of 15.2G (47%), 207Mbyte/s"),
    ("  3%|▎         | 1/32 [00:00<00:05,  5.89it/s]", logging.INFO, "progress: 1 of 32 (3%), 5.89it/s"),
])
def test_each_line_gets_its_real_level(line: str, level: int, text: str | None) -> None:
    seen = classify(line)
    assert seen.level == level
    assert seen.text == (text if text is not None else line.strip())
    assert seen.progress is ("%|" in line)


def test_a_tool_run_logs_warnings_and_errors_at_their_level_and_bars_as_progress(caplog, tmp_path: Path) -> None:
    script = tmp_path / "tool.py"
    script.write_text(
        "import sys, time\n"
        "for i in range(1, 4):\n"
        "    sys.stdout.write(f'\\rWriting:  {i * 33}%|###   | {i}.0G/3.0G [00:0{i}<00:01, 1.0Gbyte/s]')\n"
        "    sys.stdout.flush()\n"
        "print()\n"
        "print('WARNING:hf-to-gguf:Unknown RoPE type: default')\n"
        "print('WARNING:gguf.vocab:no merges found')\n"
        "print('ERROR:hf-to-gguf:something is wrong')\n")
    with caplog.at_level(logging.DEBUG, logger="include.gguf.tools"):
        code, tail = run_streaming([sys.executable, str(script)], env={}, what="tool")
    assert code == 0 and tail[-1] == "ERROR:hf-to-gguf:something is wrong"
    levels = {r.getMessage().split("] ", 1)[-1]: r.levelno for r in caplog.records if "] " in r.getMessage()}
    assert levels["WARNING:gguf.vocab:no merges found"] == logging.WARNING
    assert levels["ERROR:hf-to-gguf:something is wrong"] == logging.ERROR
    assert "WARNING:hf-to-gguf:Unknown RoPE type: default" not in levels or \
        levels["WARNING:hf-to-gguf:Unknown RoPE type: default"] == logging.INFO
    bars = [r for r in caplog.records if "Writing: " in r.getMessage()]
    assert bars and all("%|" not in r.getMessage() and " of 3.0G (" in r.getMessage() for r in bars)


def test_llama_cpp_lines_keep_their_level_and_continuations_join(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        llama_log.emit(3, "llama_model_load: tensor 'x' has an odd ")
        llama_log.emit(5, "shape\n")
        llama_log.emit(4, "llama_model_load: error loading model\n")
        llama_log.emit(2, "llama_context: n_ctx = 512\n")
        llama_log.emit(3, "llama_context: n_ctx_seq (512) > n_ctx_train (0) -- possible training context overflow\n")
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llama.cpp"]
    assert got == [
        (logging.WARNING, "llama_model_load: tensor 'x' has an odd shape"),
        (logging.ERROR, "llama_model_load: error loading model"),
        (logging.DEBUG, "llama_context: n_ctx = 512"),
        (logging.INFO, "llama_context: n_ctx_seq (512) > n_ctx_train (0) -- possible training context overflow"),
    ]


def test_loading_a_gguf_writes_nothing_to_stderr(gguf_root: Path, capfd, caplog, tmp_path: Path) -> None:
    """The tokenizer check's vocabulary-only load makes llama.cpp warn (n_ctx_train 0): through llama-cpp-python's own
    callback that line goes to stderr, which an Airflow task logs at ERROR; routed, it is an INFO notice."""
    import subprocess

    gguf = tiny_gguf(gguf_root, "f16")
    load = f"from llama_cpp import Llama; Llama(model_path={str(gguf)!r}, vocab_only=True, verbose=False)"
    unrouted = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True)
    assert "possible training context overflow" in unrouted.stderr  # what the task log showed at ERROR

    from llama_cpp import Llama

    llama_log.route_llama_logs()
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    assert capfd.readouterr().err == ""
    notices = [r for r in caplog.records if "possible training context overflow" in r.getMessage()]
    assert [r.levelno for r in notices] == [logging.INFO]
