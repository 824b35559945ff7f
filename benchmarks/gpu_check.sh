#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_check.py): one command, <= 8 minutes on one GPU, no hub.
#   bash benchmarks/gpu_check.sh            on a CUDA GPU: T4 checks + full-size SD 1.5 memory/speed -> RESULTS.md
#   bash benchmarks/gpu_check.sh --smoke    anywhere (CI): the same script on the CPU
# On a lent machine that lacks diffusers/bitsandbytes, carry their wheels in .whl/ (see benchmarks/RESULTS.md, "GPU check"):
# they are installed into /tmp/site first. Figures and logs go to $OUT when it is set (the device tool's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
