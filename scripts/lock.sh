#!/usr/bin/env bash
# Regenerate constraints.txt from the current .venv (after changing dependencies in pyproject.toml).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
{
  echo "# pip freeze of a good .venv (Python 3.11): installs never backtrack. Regenerate with scripts/lock.sh."
  "$ROOT/.venv/bin/python" -m pip freeze --exclude-editable \
    | sed -e 's|^llama_cpp_python @ .*|llama_cpp_python==0.3.36|' -e 's|^torch==\(.*\)+cpu$|torch==\1|'
} > "$ROOT/constraints.txt"
