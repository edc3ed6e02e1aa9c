#!/usr/bin/env bash
# Set up everything this project needs on a Debian machine with Python 3.11, idempotently:
# system packages (espeak-ng for the demo dataset), a virtual environment in .venv with PyTorch (CPU build
# unless an NVIDIA GPU is present) and the project with its test tools, and the two face-detector model files.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v espeak-ng >/dev/null; then
    echo "[setup] installing espeak-ng (speech for the demo dataset)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq espeak-ng >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] installing PyTorch with CUDA"
        $PIP install -q "torch==2.13.0"
    else
        echo "[setup] installing PyTorch (CPU build)"
        $PIP install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --timeout 20 --retries 1
    fi
fi

# Re-install the project only when its dependency list changed.
stamp=.venv/.hicmae-deps
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing the project and its dependencies"
    $PIP install -q -e '.[dev]'
    echo "$want" > "$stamp"
fi

if [ -f preprocessing/face_model.py ]; then
    .venv/bin/python -m preprocessing.face_model
fi
echo "[setup] ready: .venv"
