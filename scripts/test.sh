#!/usr/bin/env bash
# The test suite: lint, then pytest (real Airflow, real sshd on 127.0.0.1, real llama.cpp, stand-ins for
# the Hugging Face Hub and Slack). Extra arguments go to pytest, e.g. scripts/test.sh -k merge.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"

# The SSH tests need OpenSSH's server and rsync (started by the tests on 127.0.0.1, never as a service);
# the Deployments page test needs Debian's chromium (run headless).
if [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "==> installing openssh-server, rsync and chromium (apt)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends openssh-server rsync \
    chromium >/dev/null
fi

cd "$ROOT"
"$VENV/bin/ruff" check .
# The tests must leave the checkout as they found it (they write only under temp dirs and tests/artifacts/).
before="$(git status --porcelain 2>/dev/null || true)"
"$VENV/bin/python" -m pytest "$@"
after="$(git status --porcelain 2>/dev/null || true)"
if [ "$before" != "$after" ]; then
  echo "the tests changed the checkout (git status --porcelain, before vs after):" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
