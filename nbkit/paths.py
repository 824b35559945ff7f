"""Where the kit's files are: the repository root and the folders in it, and the cache.

This module imports nothing from nbkit (every other module may import it).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root (the folder holding nbkit/)
DATA_DIR = Path(os.environ.get("NBKIT_DATA", ROOT / "data"))  # shipped data (override with NBKIT_DATA)
CONFIGS_DIR = ROOT / "configs"
NOTEBOOKS_DIR = ROOT / "notebooks"
SAMPLE_INSTANCE_DIR = DATA_DIR / "instance" / "zwx_star"  # the toy subject's pictures (INSTANCE_DIR = "sample")


def cache_dir() -> Path:
    """Where the kit keeps what it builds or generates (override with NBKIT_CACHE)."""
    return Path(os.environ.get("NBKIT_CACHE", Path.home() / ".cache" / "nbkit"))
