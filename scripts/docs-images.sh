#!/usr/bin/env bash
# Refresh the README's Deployments page screenshot (docs/images/deployments.png) from a real run: the browser
# test writes its screenshot under tests/artifacts/ as always, and copies it over the tracked image only here.
# The test suite itself (scripts/test.sh) never writes a tracked file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
LORA_DEPLOY_REFRESH_DOCS_IMAGES=1 "$VENV/bin/python" -m pytest -q tests/e2e/test_deployments_page.py "$@"
git status --short docs/images/deployments.png
