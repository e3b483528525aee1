#!/usr/bin/env bash
# Run the demo in a real local Airflow with its UI: api-server, scheduler, dag-processor and triggerer
# (LocalExecutor, SQLite) under $LORA_DEPLOY_HOME/airflow, with this project's DAGs and the demo config.
# Open http://127.0.0.1:${AIRFLOW_PORT:-8080}, log in as `admin` with the password printed at start (kept in
# $LORA_DEPLOY_HOME/airflow/simple_auth_manager_passwords.json.generated), unpause deploy_demo and trigger it
# from its form. Ctrl-C stops everything.
#
# Everything listens on 127.0.0.1 only: the api-server, and no log server (the scheduler and triggerer run with
# --skip-serve-logs; the UI reads the task logs from $AIRFLOW_HOME/logs on this machine). To open the UI to other
# machines on purpose, set LORA_DEPLOY_AIRFLOW_HOST=0.0.0.0 (or one interface's address), and first replace the
# simple auth manager's generated admin password with real authentication
# (docs/operations.md#exposing-the-local-airflow-beyond-this-machine).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
export LORA_DEPLOY_HOME="${LORA_DEPLOY_HOME:-$HOME/.lora-deploy}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$LORA_DEPLOY_HOME/airflow}"
export LORA_DEPLOY_CONFIG="${LORA_DEPLOY_CONFIG:-$ROOT/config/models.yaml}"
HOST="${LORA_DEPLOY_AIRFLOW_HOST:-127.0.0.1}"
PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
# A deploy's next task starts within ~0.5 s of the previous one (Airflow's idle loop default: 1 s); faster
# polling costs the stages CPU on small machines (docs/operations.md#scheduler-latency).
export AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME="${AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME:-0.5}"
export AIRFLOW__API__HOST="$HOST"
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$PORT"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$PORT/execution/"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$VENV/bin:$PATH"
mkdir -p "$AIRFLOW_HOME"
"$VENV/bin/python" -c "from tests.fixtures.demo_inputs import prepare_demo; from pathlib import Path; import os; \
prepare_demo(Path(os.environ['LORA_DEPLOY_HOME']))"
"$VENV/bin/airflow" db migrate >/dev/null
# settings.pools of the config (the demo declares none): created or resized before anything is scheduled.
"$VENV/bin/python" -m include.cli.pools | while IFS=$'\t' read -r name slots description; do
  "$VENV/bin/airflow" pools set "$name" "$slots" "$description" >/dev/null && echo "pool $name: $slots slots"
done
PASSWORDS="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
if [ ! -s "$PASSWORDS" ]; then
  (umask 077 && "$VENV/bin/python" -c "import json, secrets, sys; \
json.dump({'admin': secrets.token_urlsafe(12)}, open(sys.argv[1], 'w'))" "$PASSWORDS")
fi
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$PASSWORDS"

# Each component runs in its own process group (setsid), stopped as a whole: SIGTERM, then SIGKILL after 20 s
# for what is left (the scheduler's LocalExecutor workers).
pids=()
alive() { for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && return 0; done; return 1; }
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 1 40); do alive || break; sleep 0.5; done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap stop EXIT
trap 'echo "stopping Airflow"; stop; exit 130' INT TERM
mkdir -p "$AIRFLOW_HOME/logs"
for component in api-server "scheduler --skip-serve-logs" dag-processor "triggerer --skip-serve-logs"; do
  # shellcheck disable=SC2086  # the flag is a separate word
  setsid "$VENV/bin/airflow" $component >>"$AIRFLOW_HOME/logs/${component%% *}.log" 2>&1 </dev/null &
  pids+=("$!")
done
echo "Airflow is starting on http://$HOST:$PORT (logs: $AIRFLOW_HOME/logs/{api-server,scheduler,dag-processor,triggerer}.log)"
"$VENV/bin/python" - "$PORT" <<'PY' || echo "the api-server is not answering yet: see its log" >&2
import sys, time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v2/monitor/health", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit(1)
PY
"$VENV/bin/python" -c "import json, sys; print('log in as admin with password', json.load(open(sys.argv[1]))['admin'], \
'(kept in', sys.argv[1] + ')')" "$PASSWORDS"
if [ "$HOST" != "127.0.0.1" ] && [ "$HOST" != "localhost" ] && [ "$HOST" != "::1" ]; then
  echo "WARNING: the UI listens on $HOST, reachable from other machines: use real authentication, not this password" >&2
fi
echo "Ctrl-C stops everything"
wait -n "${pids[@]}" || true
echo "an Airflow component exited: stopping the others (see $AIRFLOW_HOME/logs)" >&2
exit 1
