#!/usr/bin/env bash
# Run every notebook of the course with papermill, one after the other, and say which passed.
# For instructors: check a classroom machine or image, hand out executed copies, or run the course for each
# student's photos.
#
#   bash tools/run_all.sh [OUT_DIR] [extra papermill args, e.g. -p MAX_TRAIN_STEPS 200]
#
# Environment: MODEL (default offline; "auto" picks SD 1.5 on a GPU with the hub), SMOKE=1 (tiny settings: a quick
# check of the whole course), INSTANCE_DIR (a folder of photos, passed to every notebook), NO_SETUP=1 (skip
# tools/setup.sh), PYTHON (default .venv/bin/python). Writes OUT_DIR/NN_topic.ipynb (executed), OUT_DIR/NN_topic/
# (what the notebook wrote) and OUT_DIR/NN_topic.log; keeps going after a failure; exits 1 if any notebook failed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/run_all}
[ $# -gt 0 ] && shift
[ "${NO_SETUP:-0}" = 1 ] || bash tools/setup.sh
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
args=(-p MODEL "${MODEL:-offline}")
[ "${SMOKE:-0}" = 1 ] && args+=(-p SMOKE True)
[ -n "${INSTANCE_DIR:-}" ] && args+=(-p INSTANCE_DIR "$(cd "$INSTANCE_DIR" && pwd)")
failed=()
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  name=$(basename "$nb" .ipynb)
  start=$(date +%s)
  printf '%-28s' "$name"
  if "$PY" -m papermill "$nb" "$OUT/$name.ipynb" "${args[@]}" -p OUTPUT_DIR "$OUT/$name" "$@" >"$OUT/$name.log" 2>&1; then
    echo "ok      $(( $(date +%s) - start )) s"
  else
    echo "FAILED  $(( $(date +%s) - start )) s  (see $OUT/$name.log)"
    failed+=("$name")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all notebooks ran; executed copies and outputs are in $OUT"
