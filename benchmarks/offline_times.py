"""Measure each notebook's default run on the offline model: wall time and bytes written, into docs/offline_times.json
(what `nb.costs` shows as the "measured" CPU row of each notebook).

    python -m benchmarks.offline_times                      # every notebook (tens of minutes on 2 cores)
    python -m benchmarks.offline_times 01_dreambooth 03_schedulers

Each notebook runs end to end with papermill and its own default parameters, MODEL=offline, in a temporary folder.
The machine's 1-minute load average is recorded with each row: on a machine shared with other jobs the times are
longer than on an idle one, and the row says so. Rows of notebooks not named are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "offline_times.json"


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _written(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def measure(notebook: str) -> dict:
    """One default offline run of `notebook`, timed; raises when the run fails (a failed run measures nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        load, t = _load(), time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{notebook}.ipynb"),
                              str(Path(tmp) / f"{notebook}.ipynb"), "-p", "MODEL", "offline", "-p", "OUTPUT_DIR",
                              str(out), "--cwd", tmp], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - t
        if run.returncode:
            raise RuntimeError(f"{notebook} failed:\n{run.stderr[-2000:]}")
        return {"seconds": round(seconds, 1), "written": _written(out) if out.exists() else 0,
                "date": datetime.date.today().isoformat(), "load": round(max(load, _load()), 2),
                "cores": os.cpu_count(), "machine": platform.machine(), "commit": _commit()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", help="notebook stems (default: every notebook)")
    args = ap.parse_args(argv)
    names = args.notebooks or sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    rows = json.loads(OUT.read_text()) if OUT.exists() else {}
    for name in names:
        rows[name] = measure(name)
        OUT.write_text(json.dumps(dict(sorted(rows.items())), indent=1) + "\n")  # after each: a stop keeps the rest
        print(name, rows[name], flush=True)


if __name__ == "__main__":
    main()
