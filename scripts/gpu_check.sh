#!/usr/bin/env bash
# GPU acceptance check, one command on a GPU host (under 8 minutes):
#   scripts/gpu_check.sh [--model HUB_ID_OR_DIR] [--steps N]
# Runs a few GRPO steps with vLLM colocated (and disaggregated when two GPUs are
# present) plus the CUDA tests, then prints one JSON line. See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then python=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export WANDB_MODE=${WANDB_MODE:-offline}
exec timeout 480 "$python" scripts/gpu_check.py "$@"
