#!/usr/bin/env bash
# Run the demo in a real local Airflow with its UI: `airflow standalone` (api-server + scheduler +
# dag-processor + triggerer, LocalExecutor, SQLite) under $LORA_DEPLOY_HOME/airflow, with this project's
# DAGs and the demo config. Open http://127.0.0.1:${AIRFLOW_PORT:-8080}, log in as `admin` with the
# password printed at start (also in $LORA_DEPLOY_HOME/airflow/simple_auth_manager_passwords.json.generated),
# unpause deploy_demo and trigger it from its form. Ctrl-C stops everything.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
export LORA_DEPLOY_HOME="${LORA_DEPLOY_HOME:-$HOME/.lora-deploy}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$LORA_DEPLOY_HOME/airflow}"
export LORA_DEPLOY_CONFIG="${LORA_DEPLOY_CONFIG:-$ROOT/config/models.yaml}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# A deploy's next task starts within ~0.5 s of the previous one (Airflow's idle loop default: 1 s); faster
# polling costs the stages CPU on small machines (docs/operations.md#scheduler-latency).
export AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME="${AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME:-0.5}"
export AIRFLOW__API__PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:${AIRFLOW_PORT:-8080}"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:${AIRFLOW_PORT:-8080}/execution/"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$VENV/bin:$PATH"   # standalone starts each component as `airflow <component>`
"$VENV/bin/python" -c "from tests.fixtures.demo_inputs import prepare_demo; from pathlib import Path; import os; \
prepare_demo(Path(os.environ['LORA_DEPLOY_HOME']))"
"$VENV/bin/airflow" db migrate >/dev/null
# settings.pools of the config (the demo declares none): created or resized before anything is scheduled.
"$VENV/bin/python" -m include.cli.pools | while IFS=$'\t' read -r name slots description; do
  "$VENV/bin/airflow" pools set "$name" "$slots" "$description" >/dev/null && echo "pool $name: $slots slots"
done
exec "$VENV/bin/airflow" standalone
