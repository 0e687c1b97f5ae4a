#!/usr/bin/env bash
# Create .venv and install the project for CPU use (torch's local CPU wheel first, so nothing pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, diffusers, grpc; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'grpcio', grpc.__version__)"
# The Node.js client's packages (its tests run against a live stack); Node 18+ and npm are expected on the machine.
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix clients/node --no-audit --no-fund --silent
fi
