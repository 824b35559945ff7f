#!/usr/bin/env bash
# Make .venv with everything the kit needs, exactly as pinned in requirements-lock.txt (every package; tools/lock.sh).
# Keeps a torch that is already there (a GPU build stays); otherwise installs TORCH_SPEC (default torch==2.13.0:
# a CPU build on the course machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "tools/setup.sh: requirements-lock.txt is resolved for Python 3.11+ and $PY is $("$PY" -V 2>&1)." >&2
  echo "Run it with PYTHON=python3.11 (or newer), or install the ranges instead: pip install -e '.[test]'." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -r requirements-lock.txt -e ".[test]"
