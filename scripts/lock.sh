#!/usr/bin/env bash
# Refresh requirements.lock: a fresh temporary environment gets PyTorch (CPU build, the version scripts/setup.sh
# pins) and the project with its dev extra, at the newest versions pyproject.toml allows; all that is installed
# then, less torch (installed per machine), pip and the project itself, becomes the lock. Run the tests before
# committing it.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=$(sed -n 's/^TORCH_VERSION=\([^ ]*\).*/\1/p' scripts/setup.sh)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/env"
PIP="$tmp/env/bin/python -m pip"
# The CPU wheel, as scripts/setup.sh installs it: the CUDA one would add NVIDIA's libraries to the lock.
$PIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu --timeout 20 --retries 1
# pip resolves, not uv: where several resolutions exist they pick differently, and pip's is the one the
# environments set up before this lock were tested with.
$PIP install -q -e '.[dev]'
{
    cat <<'HEADER'
# The exact versions of every dependency of the project (pyproject.toml with its dev extra, transitively) for
# Linux and Python 3.11, installed by scripts/setup.sh and docker/Dockerfile. torch is not here: each installs it
# first, the CPU or the CUDA build as the machine needs. Refresh (newest versions pyproject.toml allows):
#   bash scripts/lock.sh
HEADER
    $PIP freeze --all --exclude-editable | grep -v -i -E '^(pip|torch)=='
} > "$tmp/requirements.lock"
mv "$tmp/requirements.lock" requirements.lock
echo "[lock] requirements.lock: $(grep -c '^[^#]' requirements.lock) packages"
