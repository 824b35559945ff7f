#!/usr/bin/env bash
# Make .venv with everything the kit needs. Keeps a torch that is already there (a GPU build stays);
# otherwise installs TORCH_SPEC (default torch==2.13.0: a CPU build on the course machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -r requirements-lock.txt -e ".[test]"
