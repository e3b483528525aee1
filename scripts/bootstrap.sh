# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv with everything installed.
# Idempotent: a second run checks a stamp and returns in about a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
export LORA_DEPLOY_CACHE="${LORA_DEPLOY_CACHE:-$HOME/.cache/lora-deploy}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

# cmake and a C++ compiler build llama-quantize and llama-imatrix from the pinned sources (once, cached).
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing cmake and g++ (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cmake g++ >/dev/null
  else
    echo "cmake and g++ are needed to build llama-quantize/llama-imatrix: install them (apt-get install cmake g++)" >&2
    exit 1
  fi
fi

# The pinned llama.cpp: sdist (sha256-checked) -> converter source, llama-quantize + llama-imatrix built with
# cmake (portable, once) and a wheel built once and cached. The wheel path is the last line printed.
WHEEL="$(cd "$ROOT" && "$VENV/bin/python" -m include.cli.toolchain ensure --python "$VENV/bin/python" | tail -n 1)"

STAMP="$VENV/.lora-deploy-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16) $(basename "$WHEEL")"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  # pip's and setuptools' output goes to a log file, shown only when the install fails.
  INSTALL_LOG="$VENV/install.log"
  echo "==> installing lora-deploy and its pinned dependencies into $VENV (about 1-2 minutes with a warm pip" \
       "cache; pip's output: $INSTALL_LOG)"
  if ! { "$VENV/bin/python" -m pip install --upgrade "pip>=25" \
         && "$VENV/bin/python" -m pip install -c "$ROOT/constraints.txt" --find-links "$(dirname "$WHEEL")" \
              -e "$ROOT[test]"; } >"$INSTALL_LOG" 2>&1; then
    tail -n 40 "$INSTALL_LOG" >&2
    echo "pip install failed (the last lines are above; all of it is in $INSTALL_LOG)" >&2
    exit 1
  fi
  echo "$WANT" > "$STAMP"
fi
