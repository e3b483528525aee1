#!/usr/bin/env bash
# The main job: deploy the demo model's newest LoRA adapter through the real deploy_demo DAG
# (local Airflow, SQLite, a generated tiny model) and print where the GGUFs went and the health report.
# Everything lives under $LORA_DEPLOY_HOME (default ~/.lora-deploy). Leaves no process running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec "$VENV/bin/python" "$ROOT/scripts/demo.py" "$@"
