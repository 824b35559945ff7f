"""benchmarks/findings.py without running its experiments: the saved figures round-trip through JSON, docs/findings.md
is what they render to, and `--only NAME` merges one experiment's figures into the saved ones."""

import json
import shutil
from pathlib import Path

from benchmarks import findings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("| ", "* **"))]


def test_the_saved_figures_round_trip_and_render_to_the_committed_page():
    raw = json.loads((DOCS / "findings.json").read_text())
    m = findings.load(DOCS / "findings.md")
    assert ("ddim", 100) in m["schedulers"]["runs"][(0.002, 400)]["cells"]  # tuple and number keys restored
    assert findings._jsonable(m) == raw
    held = {c: ok for c, _, _, ok in findings.verdicts(m)}
    assert held["On an overfit model DDIM with ~100 steps beats PNDM and LMS"] in (True, False, "partly")
    page = (DOCS / "findings.md").read_text()
    made = _rows(findings.markdown(m, m["seeds"] == 8))
    assert made == _rows(page)[:len(made)]  # the page regenerates; hand-written sections may follow


def test_only_runs_one_experiment_and_merges_it(tmp_path, monkeypatch):
    for name in ("findings.json", "findings.md"):
        shutil.copy(DOCS / name, tmp_path / name)
    calls = []

    def fake(m, work):
        calls.append(m["seeds"])
        return {"schedulers": {**findings.load(DOCS / "findings.md")["schedulers"], "prompt": "a photo of a zwx ring"}}

    monkeypatch.setitem(findings.EXPERIMENTS, "schedulers", fake)
    findings.main(["--quick", "--only", "schedulers", "--out", str(tmp_path / "findings.md")])
    m = findings.load(tmp_path / "findings.md")
    assert calls == [m["seeds"]] and m["schedulers"]["prompt"] == "a photo of a zwx ring"
    assert m["updates"][-1]["only"] == ["schedulers"]
    assert m["grid"] == findings.load(DOCS / "findings.md")["grid"]  # the rest kept
    assert "a photo of a zwx ring" in (tmp_path / "findings.md").read_text()
