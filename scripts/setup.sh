#!/usr/bin/env bash
# Create ./.venv and install onepoch (editable) with its test tools.
#
# PyTorch: where one is already importable in the venv it is kept. Otherwise a machine with an
# NVIDIA GPU gets the default (CUDA) build from PyPI, and a machine without one gets a CPU-only
# build -- never the multi-GB CUDA wheels: first `torch==2.13.0+cpu` through pip's configured
# indexes (a local wheel where one is provided), else PyTorch's CPU index.
# Variables: PYTHON (default python3), VENV (default .venv), TORCH_SPEC to install a torch of your own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if [ -n "${TORCH_SPEC:-}" ]; then
  pip install "$TORCH_SPEC"
elif "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing the CUDA build of torch from PyPI"
  pip install "torch>=2.3"
else
  echo "setup: no NVIDIA GPU: installing a CPU-only build of torch"
  pip install "torch==2.13.0+cpu" \
    || pip install torch --index-url https://download.pytorch.org/whl/cpu
fi
# torch is already satisfied, so this pulls only the other dependencies (matplotlib among them) and
# the test extra: pytest, plus tensorboard and safetensors (the optional extras, which the tests cover).
pip install -e ".[test]"
echo "setup: done ($VENV)"
