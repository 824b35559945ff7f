"""benchmarks/bench_memory.py in smoke mode (the offline model on the CPU): it runs, times both loops, plans."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_memory_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # one method keeps it short: the one that goes through every part (text encoder, prior preservation)
    result = bench.main(["--smoke", "--methods", "dreambooth+te+prior", "--steps", "1", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["dreambooth+te+prior"] and result["smoke"]
    for r in rows:
        assert r["nbkit"]["status"] == "ok" and r["nbkit"]["finite"] and r["nbkit"]["s_per_step"] > 0
        assert r["reference"]["status"] == "ok" and r["reference"]["s_per_step"] > 0
        assert r["planner_gib"] > 0 and math.isfinite(r["planner_gib"])
    saved = json.loads(Path(result["files"][0]).read_text())
    assert saved["versions"]["torch"] and len(saved["rows"]) == 1
    md = Path(result["files"][1]).read_text()
    assert "| dreambooth+te+prior | cpu |" in md and "reference s/step" in md
    merged = bench.main(["--merge", result["files"][0], result["files"][0]])
    assert len(merged["rows"]) == 2
