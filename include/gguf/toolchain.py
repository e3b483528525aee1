"""The pinned llama.cpp toolchain: one llama-cpp-python sdist gives the converter, gguf-py and the quantizer.

This module uses only the standard library so that the setup scripts can run it with the system
Python before the project's virtualenv exists (``python3 -m include.cli.toolchain ensure``).

Layout of the cache (``$LORA_DEPLOY_CACHE``, default ``~/.cache/lora-deploy``)::

    llama-cpp-python-0.3.36/
        llama_cpp_python-0.3.36.tar.gz   the sdist, sha256-checked
        src/                             the extracted sdist (vendor/llama.cpp holds the converter)
        wheels/                          the wheel built from that sdist (built once, ~10 min on 2 cores)
        bin/                             llama-quantize and llama-imatrix built from the same sources
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from include.errors import ToolchainError
from include.store.hashing import sha256_file

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# Recorded in every manifest and in the GGUF metadata (general.quantized_by / lora_deploy.toolchain).
PINNED_VERSION = f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (sdist sha256 {SDIST_SHA256[:12]})"
TOOLS = ("llama-quantize", "llama-imatrix")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_OPENMP=OFF",
)


def cache_root() -> Path:
    """Return the directory that holds downloaded and built tools."""
    return Path(os.environ.get("LORA_DEPLOY_CACHE", Path.home() / ".cache" / "lora-deploy")).expanduser()


@dataclass(frozen=True)
class LlamaCppToolchain:
    """Paths of one llama.cpp source tree: the converter script and its vendored gguf-py."""

    source_dir: Path
    version: str
    bin_dir: Path | None = None

    def tool(self, name: str) -> Path | None:
        """Path of a built tool (``llama-quantize``, ``llama-imatrix``) or None when this toolchain has none."""
        if self.bin_dir is None:
            return None
        path = self.bin_dir / name
        return path if path.is_file() and os.access(path, os.X_OK) else None

    @property
    def converter(self) -> Path:
        """``convert_hf_to_gguf.py`` of this tree."""
        return self.source_dir / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        """The gguf-py package directory that must go first on the converter's PYTHONPATH."""
        return self.source_dir / "gguf-py"

    def check(self) -> None:
        """Raise ToolchainError naming what is missing and how to get it."""
        for path in (self.converter, self.gguf_py / "gguf" / "__init__.py"):
            if not path.is_file():
                raise ToolchainError(f"llama.cpp toolchain incomplete: {str(path)!r} does not exist",
                                     fix="run `python3 -m include.cli.toolchain ensure`, or point "
                                         "settings.llama_cpp_dir at a llama.cpp checkout")


def pinned_dir() -> Path:
    """Directory of the pinned toolchain inside the cache."""
    return cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def pinned_toolchain() -> LlamaCppToolchain:
    """The toolchain extracted from the pinned sdist (not checked: call ``check()``)."""
    return LlamaCppToolchain(
        source_dir=pinned_dir() / "src" / "vendor" / "llama.cpp",
        version=PINNED_VERSION,
        bin_dir=pinned_dir() / "bin",
    )


def user_toolchain(llama_cpp_dir: str | None, llama_cpp_bin_dir: str | None) -> LlamaCppToolchain:
    """The toolchain named by ``settings.llama_cpp_dir`` / ``settings.llama_cpp_bin_dir``, or the pinned one.

    A user checkout's version is its ``git describe`` when available, else the directory name, so the
    manifests say which llama.cpp produced a file.
    """
    pinned = pinned_toolchain()
    if not llama_cpp_dir and not llama_cpp_bin_dir:
        return pinned
    source = Path(llama_cpp_dir).expanduser() if llama_cpp_dir else pinned.source_dir
    bins = Path(llama_cpp_bin_dir).expanduser() if llama_cpp_bin_dir else pinned.bin_dir
    parts = [f"llama.cpp checkout {source} ({_describe(source)})" if llama_cpp_dir else pinned.version]
    if llama_cpp_bin_dir:
        parts.append(f"binaries {bins}")
    return LlamaCppToolchain(source_dir=source, version="; ".join(parts), bin_dir=bins)


def _describe(source: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty", "--tags"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "no git"
    return out.stdout.strip() or "no git"


def ensure_sdist(python: str) -> Path:
    """Download the pinned sdist once and verify its sha256."""
    target = pinned_dir() / SDIST_NAME
    if target.is_file() and sha256_file(target) == SDIST_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"],
            check=True,
        )
        downloaded = Path(tmp) / SDIST_NAME
        actual = sha256_file(downloaded)
        if actual != SDIST_SHA256:
            raise ToolchainError(f"{SDIST_NAME}: sha256 {actual} != pinned {SDIST_SHA256}; refusing to use it")
        os.replace(downloaded, target)
    return target


def ensure_source(python: str) -> LlamaCppToolchain:
    """Extract the verified sdist (atomically) so its converter and gguf-py can run."""
    toolchain = pinned_toolchain()
    src = pinned_dir() / "src"
    if not (src / ".complete").is_file():
        sdist = ensure_sdist(python)
        with tempfile.TemporaryDirectory(dir=pinned_dir()) as tmp:
            with tarfile.open(sdist) as archive:
                archive.extractall(tmp, filter="data")
            shutil.rmtree(src, ignore_errors=True)
            os.replace(Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}", src)
        (src / ".complete").write_text(SDIST_SHA256 + "\n")
    toolchain.check()
    return toolchain


def ensure_wheel(python: str) -> Path:
    """Build the llama-cpp-python wheel from the verified sdist once; return its path."""
    wheels = pinned_dir() / "wheels"
    found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
    if found:
        return found[-1]
    sdist = ensure_sdist(python)
    wheels.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} from {sdist} (once; ~10 min on 2 cores)",
          flush=True)
    with tempfile.TemporaryDirectory(dir=pinned_dir()) as tmp:
        subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "-w", tmp, str(sdist)], check=True, env=env)
        built = sorted(Path(tmp).glob("*.whl"))
        if not built:
            raise ToolchainError(f"pip wheel produced no wheel for {sdist}")
        os.replace(built[0], wheels / built[0].name)
        return wheels / built[0].name


def ensure_tools(jobs: int = 2) -> Path:
    """Build llama-quantize and llama-imatrix from the pinned sources once (cmake, portable); return bin/.

    Idempotent: a ``bin/.complete`` stamp holding the sdist sha256 makes a second call instant. The build
    runs in a temp directory and the binaries are moved into place only when both exist.
    """
    bin_dir = pinned_dir() / "bin"
    stamp = bin_dir / ".complete"
    if stamp.is_file() and stamp.read_text().strip() == SDIST_SHA256 and all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    source = pinned_toolchain().source_dir
    if not (source / "CMakeLists.txt").is_file():
        raise ToolchainError(f"no llama.cpp sources at {source}; run `python3 -m include.cli.toolchain ensure`")
    for program in ("cmake", "c++"):
        if shutil.which(program) is None:
            raise ToolchainError(f"{program} is not installed; install it (apt-get install cmake g++) and re-run")
    build = pinned_dir() / "build"  # kept between attempts so an interrupted build resumes
    started = time.monotonic()
    print(f"building {', '.join(TOOLS)} from {source} (once; about 10 min on 2 cores, -j{jobs})", flush=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
                   check=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        found = next((p for p in (build / "bin" / tool, build / tool) if p.is_file()), None)
        if found is None:
            raise ToolchainError(f"the cmake build did not produce {tool} under {build}")
        tmp = bin_dir / f".{tool}.tmp"
        shutil.copy2(found, tmp)
        os.replace(tmp, bin_dir / tool)
    stamp.write_text(SDIST_SHA256 + "\n")
    print(f"built {', '.join(TOOLS)} in {time.monotonic() - started:.0f}s into {bin_dir}", flush=True)
    return bin_dir
