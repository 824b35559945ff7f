#!/usr/bin/env bash
# Regenerate requirements-lock.txt: every package of the CPU environment (direct and transitive), pinned, from
# pyproject.toml's dependencies and its gpu + test extras, for Python 3.11 on Linux (the CI machines). tools/setup.sh
# installs from it.
#
# uv keeps the versions already in requirements-lock.txt and only resolves what changed; to move a package, name it:
#   bash tools/lock.sh --upgrade-package diffusers     (then run the tests, and tools/check_floors.sh)
# torch is left out, and with it the CUDA packages a PyPI torch pulls in (nvidia-*, triton, cuda-*): tools/setup.sh
# installs torch first (TORCH_SPEC, default torch==2.13.0, the CPU build on the course machines; a CUDA build that is
# already there stays). torch's own CPU dependencies (sympy, networkx, ...) stay in the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null || { echo "uv is needed: pip install uv (https://docs.astral.sh/uv/)" >&2; exit 1; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
[ -f requirements-lock.txt ] && cp requirements-lock.txt "$tmp"  # the current pins are the preferences
uv pip compile pyproject.toml --extra gpu --extra test --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --no-header --no-annotate --quiet -o "$tmp" "$@"
{
  echo "# Every package the kit's CPU environment installs, pinned (made by tools/lock.sh from pyproject.toml with uv;"
  echo "# the tests run against exactly these). torch is installed first and separately by tools/setup.sh (TORCH_SPEC)."
  grep -vE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' "$tmp"
} > requirements-lock.txt
echo "requirements-lock.txt: $(grep -c '==' requirements-lock.txt) packages"
