#!/usr/bin/env bash
# The hand-made alternative to deploy_<model>: what a user would script with the raw tools.
#   reference.sh WORK BOX_HOST BOX_PORT BOX_USER SSH_KEY REMOTE_CHECKPOINT BASE_DIR CONVERTER QUANTIZE_CMD LMSTUDIO_DIR
# Prints one "stage seconds" line per step (what bench/pipeline/run.py reads). QUANTIZE_CMD is a command
# prefix taking "SRC DST TYPE" (llama-quantize, or the llama-cpp-python binding: the same quantizer the engine uses).
set -euo pipefail
WORK=$1 HOST=$2 PORT=$3 USER_=$4 KEY=$5 REMOTE=$6 BASE=$7 CONVERTER=$8 QUANTIZE=$9 LMSTUDIO=${10}
PY="${PYTHON:-python3}"
mkdir -p "$WORK" "$LMSTUDIO/bench/bench-GGUF"
now() { date +%s.%N; }
step() { local name=$1; shift; local t0; t0=$(now); "$@"; echo "$name $(echo "$(now) - $t0" | bc)"; }

step download rsync -a -e "ssh -p $PORT -i $KEY -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR" \
  "$USER_@$HOST:$REMOTE/" "$WORK/adapter/"

step merge "$PY" - "$BASE" "$WORK/adapter" "$WORK/merged" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out, safe_serialization=True)
for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
    if (Path(base) / name).exists():
        shutil.copyfile(Path(base) / name, Path(out) / name)
EOF

step convert "$PY" "$CONVERTER" "$WORK/merged" --outfile "$WORK/f16.gguf" --outtype f16
for quant in Q4_K_M Q5_K_M Q8_0; do
  step "quantize_$quant" $QUANTIZE "$WORK/f16.gguf" "$WORK/$quant.gguf" "$quant"
done
step install cp "$WORK/Q4_K_M.gguf" "$WORK/Q5_K_M.gguf" "$WORK/Q8_0.gguf" "$LMSTUDIO/bench/bench-GGUF/"

probe() {
  local port=$((20000 + RANDOM % 20000))
  "$PY" -m llama_cpp.server --model "$LMSTUDIO/bench/bench-GGUF/Q4_K_M.gguf" --host 127.0.0.1 --port "$port" \
    --model_alias bench >"$WORK/server.log" 2>&1 &
  local pid=$!
  until curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; do sleep 0.2; done
  curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}' >/dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
step health probe
