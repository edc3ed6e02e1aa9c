#!/usr/bin/env bash
# The two entry points of this project, each setting everything up first (idempotent):
#   ./run.sh demo    set up, then run the whole pipeline (dvc repro) on the embedded demo dataset
#   ./run.sh test    set up, then run the test suite (in 3 processes; HICMAE_TEST_PROCESSES=0: in this one)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
case "${1:-}" in
    demo) shift; dvc repro "$@" ;;
    test) shift; python -m pytest -n "${HICMAE_TEST_PROCESSES:-3}" --no-loadscope-reorder "$@" ;;
    *) echo "usage: ./run.sh demo|test [extra args for dvc repro / pytest]" >&2; exit 2 ;;
esac
