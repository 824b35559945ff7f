"""benchmarks/fullsize_cpu.py in smoke mode (the offline model at 64 px, the full-size run's code): every phase is
recorded with finite seconds and memory, the planner is compared, the exports reload. In a fresh interpreter: the
script sets the T4 rehearsal and wraps nbkit's functions, none of which may leak into the other tests."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["build + save (fp32 + fp16 variant)", "build scorers (CLIP, DINO)", "load (load_parts, variant=fp16)",
          "scorer: load CLIP + DINO", "class images", "scorer: step 0", "train step (forward, backward, 8-bit AdamW)",
          "scorer: step 1", "scorer: best/ (fp32)", "train: checkpoint", "train: save the model (fp16)",
          "export: write diffusers", "export: write single_file", "export: reload diffusers + draw",
          "export: reload single_file + draw"]


def test_fullsize_script_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fullsize_cpu.py"), "--smoke", "--out",
                           str(tmp_path), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(tmp_path.glob("smoke-fullsize-cpu-*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    r = json.loads(files[0].read_text())
    assert "error" not in r, r.get("error")
    assert not (tmp_path / "work").exists()  # the models' folder is deleted
    phases = {p["phase"]: p for p in r["phases"]}
    for name in PHASES:
        p = phases[name]
        assert math.isfinite(p["seconds"]) and p["seconds"] >= 0, p
        assert math.isfinite(p["peak_rss_gib"]) and p["peak_rss_gib"] > 0.05, p
        assert math.isfinite(p["peak_anon_gib"]) and 0 < p["peak_anon_gib"] <= p["peak_rss_gib"] * 1.01, p
    assert r["timeline"] and all(math.isfinite(rss) and 0 < anon <= rss for _, rss, anon, _ in r["timeline"])
    assert all(v["from_fp16_files"] for v in r["loaded"].values())
    assert any(k.endswith(".fp16.safetensors") for k in r["saved_files"])
    assert r["info"]["optimizer"] == "AdamW8bit" and r["info"]["precision"] == "no"
    assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0])
    assert [m["step"] for m in r["metrics"]] == [0, 1]
    for plan in ("t4", "same_precision", "measured"):
        for term in ("weights", "optimizer state", "gradients", "peak allocated"):
            v = r["planner"][plan][term]
            assert math.isfinite(v) and v > 0, (plan, term, v)
    # the counted weights, optimizer state and gradients are what the planner predicts (offline model, exact sizes)
    for term in ("weights", "gradients"):
        assert math.isclose(r["planner"]["measured"][term], r["planner"]["t4"][term], rel_tol=0.01), term
    assert math.isclose(r["planner"]["measured"]["optimizer state"], r["planner"]["t4"]["optimizer state"], rel_tol=0.1)
    assert {d["what"].split(" ", 1)[1][:11] for d in r["disk"]} >= {"class image", "checkpoint(", "trained dre"}
    assert all(d["written_gb"] is not None for d in r["disk"])
    assert [e["format"] for e in r["export"]] == ["diffusers", "single_file"] and all(e["ok"] for e in r["export"])
    md = files[0].with_suffix(".md").read_text()
    assert "| train step (forward, backward, 8-bit AdamW) |" in md and "planner, T4 plan" in md
