"""The lint (ruff, pinned in the test extra: its rules change between releases) passes on the code and the tests."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed: pip install -e '.[test]'")
def test_ruff_passes():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "nbkit", "tests", "benchmarks", "tools"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
