#!/usr/bin/env bash
# Set up everything this project needs on a Debian machine with Python 3.11, idempotently:
# system packages (espeak-ng for the demo dataset), a virtual environment in .venv with PyTorch (CPU build
# unless an NVIDIA GPU is present), the versions pinned by requirements.lock and the project with its test tools,
# and the two face-detector model files.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0  # also docker/Dockerfile's TORCH_VERSION
UV_VERSION=0.13.8     # also docker/Dockerfile's uv image
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

# The pinned version, whatever its build (+cpu, +cu128); asked of the metadata, as importing torch takes seconds.
torch_installed=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
if [ "${torch_installed%%+*}" != "$TORCH_VERSION" ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] installing PyTorch with CUDA"
        $PIP install -q "torch==$TORCH_VERSION"
    else
        echo "[setup] installing PyTorch (CPU build)"
        $PIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
            --timeout 20 --retries 1
    fi
    rm -f .venv/.hicmae-deps  # pip chose torch's dependencies: bring them back to the lock's versions below
fi

# The pinned versions, then the project itself (its entry points come from pyproject.toml), only when either
# file changed. uv installs them in seconds where pip takes minutes. It compiles their bytecode as it installs
# (pip does by default, uv does not): otherwise every process compiles the libraries it imports, and where
# PYTHONDONTWRITEBYTECODE is set (many containers and CI machines) never stores it, so that each of the many
# processes a stage starts (Ray's workers, actors and agents) imports torch, Ray and MLflow at twice the cost.
stamp=.venv/.hicmae-deps
want=$(sha256sum requirements.lock pyproject.toml)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing the dependencies pinned by requirements.lock, and the project"
    if [ "$(.venv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
        $PIP install -q "uv==$UV_VERSION"
    fi
    UV=(.venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python)
    "${UV[@]}" --strict -r requirements.lock
    "${UV[@]}" --no-deps -e .
    echo "$want" > "$stamp"
fi

if [ -f preprocessing/face_model.py ]; then
    .venv/bin/python -m preprocessing.face_model
fi
echo "[setup] ready: .venv"
