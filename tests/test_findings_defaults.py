"""Every notebook's offline defaults are the settings docs/findings.json measured, so the numbers a notebook's text
quotes from docs/findings.md are the numbers of the run its learner makes (the offline model, default parameters).

The one table below maps each notebook parameter to the findings experiment it must equal (benchmarks.findings.settings
derives each experiment's learning rate and steps from the measured sweet spot). A notebook that differs on purpose
says so in its parameter's comment and gets its own row here, with the value it keeps and why.
"""

import ast
import json
from pathlib import Path

import pytest

from benchmarks import findings
from nbkit.models.offline import OFFLINE_BATCH_SIZE

ROOT = Path(__file__).resolve().parent.parent
MEASURED = json.loads((ROOT / "docs" / "findings.json").read_text())

# notebook -> {parameter: (findings experiment, "lr" or "steps")}. MAX_TRAIN_STEPS (01, 03, 04) is shared by SD 1.5
# and the offline model; the other notebooks have an OFFLINE_* steps parameter.
TABLE = {
    "01_dreambooth": {"OFFLINE_LEARNING_RATE": ("sweet", "lr"), "MAX_TRAIN_STEPS": ("sweet", "steps")},
    "02_prior_preservation": {"OFFLINE_LEARNING_RATE": ("prior", "lr"), "OFFLINE_MAX_TRAIN_STEPS": ("prior", "steps")},
    "03_schedulers": {"OFFLINE_LEARNING_RATE": ("overfit", "lr"), "MAX_TRAIN_STEPS": ("overfit", "steps")},
    "04_text_encoder": {"OFFLINE_LEARNING_RATE": ("text_encoder", "lr"), "MAX_TRAIN_STEPS": ("text_encoder", "steps")},
    "05_textual_inversion": {"OFFLINE_TI_LEARNING_RATE": ("ti", "lr"), "OFFLINE_TI_STEPS": ("ti", "steps"),
                             "OFFLINE_DB_AFTER_TI_LEARNING_RATE": ("ti_db", "lr"),
                             "OFFLINE_DB_STEPS": ("ti_db", "steps"), "OFFLINE_DB_LEARNING_RATE": ("sweet", "lr")},
    "06_lora": {"OFFLINE_LEARNING_RATE": ("lora", "lr"), "OFFLINE_MAX_TRAIN_STEPS": ("lora", "steps"),
                "OFFLINE_DB_LEARNING_RATE": ("sweet", "lr")},
}
# Deliberate differences: (notebook, parameter) -> (the value it keeps, why). None today.
DIFFERENT: dict[tuple[str, str], tuple[object, str]] = {}


def defaults(notebook: str) -> dict:
    """The literal values of a notebook's parameters cell."""
    nb = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {t.id: ast.literal_eval(n.value) for n in tree.body for t in n.targets}


def test_findings_settings_are_the_ones_it_ran():
    """The settings derived from findings.json are those docs/findings.md reports (and those the run recorded)."""
    s = findings.settings(MEASURED)
    assert s["sweet"] == (5e-4, 400) and s["prior"] == (5e-4, 200)
    assert s["ti"] == (1e-2, 1600) and s["ti_db"] == (2.5e-4, 400) and s["lora"] == (1e-2, 400)
    if "settings" in MEASURED:  # written by the benchmark since it records them
        assert {k: tuple(v) for k, v in MEASURED["settings"].items()} == s


@pytest.mark.parametrize("notebook", sorted(TABLE))
def test_offline_defaults_are_the_measured_settings(notebook):
    got, settings = defaults(notebook), findings.settings(MEASURED)
    wrong = []
    for name, (experiment, kind) in TABLE[notebook].items():
        assert name in got, f"{notebook}: no parameter {name} (renamed? update the table in {__file__})"
        lr, steps = settings[experiment]
        want = lr if kind == "lr" else steps
        if (notebook, name) in DIFFERENT:
            want = DIFFERENT[notebook, name][0]
        if got[name] != pytest.approx(want, rel=1e-9):
            wrong.append(f"{name} = {got[name]!r}, findings measured {experiment} at {want!r}")
    assert got.get("OFFLINE_BATCH_SIZE", OFFLINE_BATCH_SIZE) == OFFLINE_BATCH_SIZE, "findings fine-tune at this batch"
    assert not wrong, f"{notebook}: " + "; ".join(wrong) + " (docs/findings.json)"
