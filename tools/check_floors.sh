#!/usr/bin/env bash
# Are pyproject.toml's lower bounds true? Build a venv with every dependency at its floor (requirements-floors.txt:
# `uv pip compile --resolution lowest-direct`, the test tools at the lock's versions), then run the unit tests there:
# every test but the notebook runs (tests/test_notebooks.py and the sweep's real papermill run).
#
#   bash tools/check_floors.sh             # the committed requirements-floors.txt
#   bash tools/check_floors.sh --compile   # first regenerate it from pyproject.toml (needs uv), e.g. after a floor moved
#   FLOORS_VENV=/tmp/floors bash tools/check_floors.sh -x tests/test_export.py   # other pytest arguments
#
# torch is the exception: the venv gets TORCH_SPEC (default torch==2.13.0, the CPU build on the kit's machines; other
# torch versions are multi-GB CUDA downloads), so torch's floor is not tested here (pyproject.toml says which it is).
# The last result is recorded in docs/dependencies.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOORS_VENV:-.venv-floors}
if [ "${1:-}" = "--compile" ]; then
  shift
  command -v uv >/dev/null || { echo "uv is needed: pip install uv (https://docs.astral.sh/uv/)" >&2; exit 1; }
  tmp=$(mktemp)
  trap 'rm -f "$tmp" "$tmp.c"' EXIT
  # the test tools are not under test: they stay at the lock's versions; torch is pinned so that nothing pulls CUDA
  grep -E '^(pytest|pytest-xdist|papermill|ipykernel|nbformat|ruff|tensorboard)==' requirements-lock.txt > "$tmp.c"
  echo "torch==2.13.0" >> "$tmp.c"
  uv pip compile pyproject.toml --extra gpu --extra test --resolution lowest-direct --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 -c "$tmp.c" --no-header --no-annotate --quiet -o "$tmp"
  {
    echo "# Every dependency at pyproject.toml's lower bound (uv pip compile --resolution lowest-direct; transitive ones"
    echo "# as resolved then), for tools/check_floors.sh. Made by \`bash tools/check_floors.sh --compile\`. torch: TORCH_SPEC."
    grep -vE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$tmp"
  } > requirements-floors.txt
fi
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install -q -r requirements-floors.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip check || echo "(pip check found the above: informative only, the tests below decide)"
"$VENV/bin/python" -m pip freeze | grep -iE '^(torch|diffusers|transformers|accelerate|peft|safetensors|huggingface.hub|tokenizers|numpy|pillow|bitsandbytes)=='
export HF_HUB_OFFLINE=1 NBKIT_CACHE="${NBKIT_CACHE:-$PWD/.cache/nbkit-floors}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$VENV/bin/python" -m pytest -q -p no:xdist -p no:cacheprovider --ignore=tests/test_notebooks.py \
  --deselect tests/test_sweep.py::test_sweep_of_real_training_on_the_offline_model "$@"
