#!/usr/bin/env bash
# Set up, then run the whole test suite (unit tests + every notebook through papermill in smoke mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 NBKIT_CACHE="${NBKIT_CACHE:-$PWD/.cache/nbkit}"
# Two test processes (one per core of a CI machine), one torch thread each; each test file runs whole on one
# worker (--dist loadfile), so a file's shared fixtures (the toy fine-tunes) are computed once.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -q -n "${NBKIT_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
