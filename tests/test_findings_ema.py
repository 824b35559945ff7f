"""benchmarks.findings --only: one experiment run alone and merged into docs/findings.*, every other figure and the
hand-written sections kept; the EMA claim's verdict (held within one seed's share). The experiment is faked here
(no training): the real one is what docs/findings.json records."""

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import findings

ROOT = Path(__file__).resolve().parent.parent


def scores(subject, context, drift=1.0):
    return {"subject_fidelity": subject, "prompt_fidelity": context, "class_drift": drift, "seconds": 1.0}


@pytest.fixture
def docs(tmp_path, offline_dir):
    for suffix in (".md", ".json"):
        shutil.copy(ROOT / "docs" / f"findings{suffix}", tmp_path / f"findings{suffix}")
    return tmp_path / "findings.md"


def run_only(docs, monkeypatch, on, off, seen):
    def fake(m, work):
        seen.append((tuple(m["sweet"]), m["seeds"], work.is_dir()))
        return {"ema": {"off": off, "on": on}}

    monkeypatch.setitem(findings.EXPERIMENTS, "ema", fake)
    findings.main(["--quick", "--only", "ema", "--out", str(docs)])
    return docs.read_text(), json.loads(docs.with_suffix(".json").read_text())


def test_only_merges_one_experiment_and_keeps_the_rest(docs, monkeypatch):
    before_md, before = docs.read_text(), json.loads(docs.with_suffix(".json").read_text())
    seen = []
    md, after = run_only(docs, monkeypatch, scores(0.875, 1.0), scores(0.75, 1.0), seen)
    assert seen == [(tuple(before["sweet"]), before["seeds"], True)]  # it ran once, on the recorded sweet spot
    assert {k: v for k, v in after.items() if k not in ("ema", "updates", "date")} == \
           {k: v for k, v in before.items() if k not in ("ema", "updates", "date")}
    assert after["ema"]["on"]["subject_fidelity"] == 0.875 and after["updates"][-1]["only"] == ["ema"]
    kept = [line for line in before_md.splitlines() if line.startswith(("|", "* ", "## ")) and "EMA" not in line]
    assert kept and all(line in md.splitlines() for line in kept)  # every other row, the grid, the notes
    row = next(line for line in md.splitlines() if line.startswith("| EMA made no difference |"))
    assert "balance 88% with EMA, 75% without" in row and row.endswith("| yes |")  # 12.5 % = one seed of 8
    assert md.count("## What the toy world does not show") == before_md.count("## What the toy world does not show")
    assert "`--only ema` added on" in md.splitlines()[2]
    md, again = run_only(docs, monkeypatch, scores(1.0, 1.0), scores(0.75, 1.0), seen)  # 25 %: two seeds
    assert next(line for line in md.splitlines() if line.startswith("| EMA")).endswith("| **no** |")
    assert len(again["updates"]) == len(after["updates"])  # the same experiment's update replaced, not repeated


def test_only_refuses_what_it_cannot_merge(docs, tmp_path):
    with pytest.raises(SystemExit, match="not among"):
        findings.main(["--quick", "--only", "nope", "--out", str(docs)])
    with pytest.raises(SystemExit, match="pass --quick as it was made"):
        findings.main(["--only", "ema", "--out", str(docs)])  # the recorded figures are --quick ones (8 seeds)
    with pytest.raises(SystemExit, match="run the whole benchmark once first"):
        findings.main(["--quick", "--only", "ema", "--out", str(tmp_path / "none" / "findings.md")])
