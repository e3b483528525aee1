"""The smoke check's server (``python -m include.cli.serve``): loopback only, and quantized weights kept file-backed.

Memory is judged by ``RssAnon`` (``/proc/<pid>/status``) of the running server: llama.cpp's repack buffers are
anonymous memory, while pages of the mmap-ed GGUF are file-backed and not counted there. Both servers are given the
same small context, so the KV cache (anonymous too) is the same few MB in each.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil
import pytest

from include.cli.serve import server_argv
from include.health.smoke import serve_gguf
from tests.include.gguf.test_reference import quantized

N_CTX = 256


def _server(gguf: Path) -> psutil.Process:
    """The running server process that serves ``gguf`` (a child of this process)."""
    [proc] = [c for c in psutil.Process().children() if str(gguf) in c.cmdline()]
    return proc


def _rss_anon_mb(proc: psutil.Process) -> float:
    status = Path(f"/proc/{proc.pid}/status").read_text()
    return next(int(x.split()[1]) for x in status.splitlines() if x.startswith("RssAnon:")) / 1024


def served_rss_anon_mb(gguf: Path, server_module: str) -> float:
    """RssAnon (MB) of the server of ``gguf`` once it is ready and has answered one completion."""
    with serve_gguf(gguf, model_id="m", n_ctx=N_CTX, startup_timeout_s=120, server_module=server_module) as url:
        answer = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "Hello", "max_tokens": 4},
                            timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1, answer.text
        return _rss_anon_mb(_server(gguf))


def test_the_smoke_server_keeps_quantized_weights_out_of_anonymous_memory(q8_gguf: Path) -> None:
    """Served through the launcher, a 74 MB Q4_K_M costs a few MB of anonymous memory; the plain server copies it.

    Measured on an AVX2 CPU: the launcher's server holds ~4 MB more for the Q4_K_M than for the 1.8 MB tiny model;
    plain ``llama_cpp.server`` holds ~57 MB more than the launcher for the same file (the repacked weights).
    """
    gguf = quantized("deep-8", "Q4_K_M")
    size_mb = gguf.stat().st_size / 2**20
    baseline = served_rss_anon_mb(q8_gguf, "include.cli.serve")  # Python, the server, a tiny model
    launcher = served_rss_anon_mb(gguf, "include.cli.serve")
    assert launcher - baseline < 0.25 * size_mb, (baseline, launcher, size_mb)
    if "avx2" in Path("/proc/cpuinfo").read_text():  # llama.cpp repacks K-quants on AVX2 CPUs by default
        plain = served_rss_anon_mb(gguf, "llama_cpp.server")
        assert plain - launcher > 0.5 * size_mb, (plain, launcher, size_mb)


def test_the_smoke_server_listens_on_loopback_whatever_the_environment(q8_gguf: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """llama_cpp.server lets HOST, PORT and CONFIG_FILE override its command line: the smoke check drops them."""
    monkeypatch.setenv("HOST", "127.0.0.2")
    monkeypatch.setenv("PORT", "9")
    monkeypatch.setenv("CONFIG_FILE", "/nonexistent/config.json")
    with serve_gguf(q8_gguf, model_id="tiny-q8", startup_timeout_s=60) as url:
        listening = [c.laddr for c in _server(q8_gguf).net_connections() if c.status == psutil.CONN_LISTEN]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", int(url.rsplit(":", 1)[1]))]
        assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny-q8"


@pytest.mark.parametrize(("argv", "expected"), [
    (["--model", "m.gguf"], ["--model", "m.gguf", "--host", "127.0.0.1"]),
    (["--model", "m.gguf", "--host", "::1"], ["--model", "m.gguf", "--host", "::1"]),
    (["--host=0.0.0.0", "--port", "8"], ["--host=0.0.0.0", "--port", "8"]),
])
def test_the_launcher_defaults_to_loopback_and_keeps_a_given_host(argv: list[str], expected: list[str]) -> None:
    assert server_argv(argv) == expected
