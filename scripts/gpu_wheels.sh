#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine's image lacks into .whl/ (ignored by git; carried with `carry: [".whl"]`).
# The image has torch, transformers, grpcio, protobuf, numpy, safetensors, huggingface-hub, regex, requests, pillow.
# On the device, install them with the prelude documented in docs/performance.md:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata structlog sageattention==1.0.6 \
  grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 av
ls -1 .whl
