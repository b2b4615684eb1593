#!/usr/bin/env bash
# The test command (README): set up, start what the tests need, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${TRINITY_VENV:-.venv}/bin/python" -m pytest -q tests "$@"
