#!/usr/bin/env bash
# The demo (README's first command): set up, make the tiny Gemma-3, start the service
# (API + one worker; Redis if it answers, else an embedded broker), submit the tiny job over HTTP,
# follow it, download the q4_k_m GGUF, check its sha256, generate a reply with llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${TRINITY_VENV:-.venv}
DEMO=${TRINITY_DEMO_DIR:-$PWD/.trinity/demo}
PORT=${TRINITY_DEMO_PORT:-8765}
mkdir -p "$DEMO"
export TRINITY_DATA_DIR="$DEMO/data" TRINITY_MODEL_DIRS="$DEMO" HF_HUB_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "==> demo files under $DEMO (service log: $DEMO/serve.log)"
"$VENV/bin/trinity" tiny-model "$DEMO/tiny-model"
KEY=$("$VENV/bin/trinity" keys create --tenant demo 2>/dev/null)
"$VENV/bin/trinity" serve --port "$PORT" >"$DEMO/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
"$VENV/bin/python" scripts/demo_client.py --url "http://127.0.0.1:$PORT" --key "$KEY" \
  --spec examples/tiny.yaml --data examples/data/tiny-chat.jsonl --model "$DEMO/tiny-model" --out "$DEMO/download"
