#!/usr/bin/env bash
# Set up, then run the whole test suite (unit tests + every notebook through papermill in smoke mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 NBKIT_CACHE="${NBKIT_CACHE:-$PWD/.cache/nbkit}"
.venv/bin/python -m pytest -q "$@"
