"""The sweet-spot pick of a sweep (nbkit.notebook.sweep_pick), the base model's row (sweep_results.baseline), and the
one toy grid shared by notebook 07, configs/sweeps/toy_lr_steps.yaml and benchmarks/findings.py."""

import json
import math
from pathlib import Path

import pytest

from nbkit.notebook import sweep, sweep_pick
from nbkit.notebook.sweep_results import baseline
from nbkit.notebook.sweep_spec import toy_grid

ROOT = Path(__file__).resolve().parent.parent
BASE = {"subject_fidelity": 0.0, "prompt_fidelity": 1.0, "class_drift": 0.0}


def row(lr, steps, subject, prompt, drift=0.1, status="ok", **extra):
    r = {"run": f"lr{lr:g}-s{steps}", "LEARNING_RATE": lr, "MAX_TRAIN_STEPS": steps, "status": status,
         "subject_fidelity": subject, "prompt_fidelity": prompt, "class_drift": drift, **extra}
    return {k: v for k, v in r.items() if v is not None}


def test_the_best_balance_wins_and_an_overfit_run_loses():
    rows = [row(1e-4, 100, 0.3, 1.0), row(5e-4, 200, 0.8, 0.9), row(2e-3, 200, 1.0, 0.4)]
    got = sweep_pick.pick(rows, BASE)
    assert got.row["run"] == "lr0.0005-s200" and got.balance == pytest.approx(0.8)
    assert got.balances == {"lr0.0001-s100": 0.3, "lr0.0005-s200": 0.8, "lr0.002-s200": 0.4}
    assert got.fell_back == [] and got.left_out == {} and got.base_balance == 0.0
    assert "LEARNING_RATE = 0.0005, 200 steps" in got.why and "within the limit 0.20" in got.why


def test_prompt_fidelity_counts_as_a_share_of_the_base_models():
    """CLIP-T is about 0.3 on SD 1.5: compared with the base model's, not taken as it is (min would always be it)."""
    base = {"subject_fidelity": 0.35, "prompt_fidelity": 0.32, "class_drift": 0.4}
    rows = [row(2e-6, 200, 0.55, 0.31, 0.45), row(2e-6, 400, 0.7, 0.30, 0.5), row(5e-6, 800, 0.8, 0.2, 0.55)]
    got = sweep_pick.pick(rows, base)
    assert got.row["MAX_TRAIN_STEPS"] == 400, got.why
    assert got.balances["lr5e-06-s800"] == pytest.approx(0.2 / 0.32, abs=1e-6)
    assert "94% of the base model's" in got.why and got.base_balance == pytest.approx(0.35)


def test_ties_go_to_fewer_steps_then_the_lower_rate():
    rows = [row(5e-4, 400, 0.75, 1.0), row(5e-4, 200, 0.75, 1.0), row(1e-4, 200, 0.75, 1.0)]
    got = sweep_pick.pick(rows, BASE)
    assert got.row["run"] == "lr0.0001-s200"
    assert "tied with lr0.0005-s400, lr0.0005-s200" in got.why


def test_the_drift_limit_prefers_a_near_equal_run_that_drifts_less_and_says_so():
    rows = [row(5e-4, 400, 0.9, 1.0, drift=0.9), row(1e-4, 400, 0.85, 1.0, drift=0.15), row(1e-4, 100, 0.2, 1.0, 0.0)]
    got = sweep_pick.pick(rows, BASE)
    assert got.row["run"] == "lr0.0001-s400" and got.fell_back == []
    assert "the best balance, 0.90 at LEARNING_RATE = 0.0005, 400 steps, drifts 0.90" in got.why
    # an underfit run that does not drift is no candidate: only runs within 90% of the best balance are
    assert sweep_pick.pick([rows[0], rows[2]], BASE).row["run"] == "lr0.0005-s400"


def test_when_every_run_drifts_it_says_it_picked_without_the_drift_limit():
    """The toy findings: DreamBooth without prior preservation drifts everywhere; the rule says so, and still picks
    what benchmarks/findings.py measured as the sweet spot."""
    f = sweep_pick.toy_findings()
    got = sweep_pick.pick(f["rows"], f["base"])
    rate_key, steps_key = list(toy_grid())
    assert (got.row[rate_key], got.row[steps_key]) == f["sweet"]
    assert len(got.fell_back) == 1 and "class drift" in got.fell_back[0] and "without the drift limit" in str(got)
    assert "over the limit" in got.why


def test_a_criterion_missing_for_some_runs_is_named_with_the_runs():
    rows = [row(1e-4, 100, 0.5, 1.0), row(5e-4, 100, 0.9, 1.0, drift=None), row(2e-3, 100, math.nan, 0.5),
            row(1e-3, 100, 0.99, 1.0, status="failed")]
    got = sweep_pick.pick(rows, BASE)
    assert got.row["run"] == "lr0.0001-s100"
    assert got.left_out == {"lr0.0005-s100": "no class_drift, which the other runs have",
                            "lr0.002-s100": "no subject_fidelity, which the other runs have",
                            "lr0.001-s100": "status failed"}
    text = str(got)
    assert "lr0.0005-s100 (no class_drift" in text and "lr0.002-s100 (no subject_fidelity" in text


def test_a_criterion_no_run_has_is_named_and_not_used():
    rows = [row(1e-4, 100, 0.5, 1.0, drift=None), row(5e-4, 100, 0.9, 1.0, drift=None)]
    got = sweep_pick.pick(rows, BASE)
    assert got.row["run"] == "lr0.0005-s100" and got.left_out == {}
    assert got.fell_back == ["no finished run has class_drift: the drift limit is not applied."]
    assert "Fallback: no finished run has class_drift" in str(got)


def test_without_base_scores_it_compares_with_the_best_run_and_says_so():
    rows = [row(1e-4, 100, 0.5, 0.8, drift=0.3), row(5e-4, 100, 0.9, 0.4, drift=0.4)]
    got = sweep_pick.pick(rows)
    assert got.row["run"] == "lr0.0001-s100" and got.base_balance is None
    assert any("best run's (0.80)" in f for f in got.fell_back)
    assert any("least-drifting run (0.30)" in f for f in got.fell_back)
    assert "of the best run's" in got.why


def test_no_pick_without_fidelities_or_finished_runs():
    unscored = [{"run": "a", "LEARNING_RATE": 1e-4, "MAX_TRAIN_STEPS": 100, "status": "ok"}]
    got = sweep_pick.pick(unscored, BASE)
    assert got.row is None and "no finished run has subject_fidelity" in got.why and "by eye" in got.why
    got = sweep_pick.pick([row(1e-4, 100, 0.5, 1.0, status="failed")])
    assert got.row is None and got.left_out == {"lr0.0001-s100": "status failed"}


def test_no_pick_when_no_run_beats_the_base_model():
    base = {"subject_fidelity": 0.4, "prompt_fidelity": 0.3, "class_drift": 0.4}  # SD 1.5-like: DINO, CLIP-T
    got = sweep_pick.pick([row(1e-6, 100, 0.38, 0.3, 0.4), row(1e-6, 200, 0.4, 0.29, 0.41)], base)
    assert got.row is None and got.base_balance == pytest.approx(0.4)
    assert "no run has a higher balance than the base model's (0.40" in got.why and "Train longer" in got.why
    assert got.balances == {"lr1e-06-s100": 0.38, "lr1e-06-s200": pytest.approx(0.4)}


def test_baseline_is_the_step_0_row_of_the_runs_own_scores(tmp_path):
    out = tmp_path / "sw"
    for lr, status, base_subject in ((1e-4, "ok", 0.0), (5e-4, "ok", 0.25), (2e-3, "failed", 0.9)):
        point = {"LEARNING_RATE": lr}
        d = out / "runs" / sweep.run_name(point)
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"status": status, "parameters": point, "point": point}))
        (d / "metrics.json").write_text(json.dumps([
            {"step": 0, "subject_fidelity": base_subject, "prompt_fidelity": 1.0, "class_drift": 0.0,
             "scorer": "toy judge", "seconds": 2.0},
            {"step": 100, "subject_fidelity": 0.8, "prompt_fidelity": 0.9, "class_drift": 1.0, "scorer": "toy judge"}]))
    base = baseline(out)
    assert base["runs"] == 2 and base["scorer"] == "toy judge" and "seconds" not in base
    assert base["subject_fidelity"] == pytest.approx(0.125) and base["spread"] == pytest.approx(0.25)
    assert baseline(tmp_path / "empty") is None


def test_one_toy_grid_for_notebook_07_the_yaml_and_findings():
    """configs/sweeps/toy_lr_steps.yaml is the grid; findings --quick measures it (docs/findings.json holds it) and
    notebook 07 runs it offline (its offline lists are empty: the toy grid, or equal to it)."""
    from benchmarks import findings

    grid = toy_grid()
    (rate_key, rates), (steps_key, steps) = grid.items()
    assert rate_key == "OFFLINE_LEARNING_RATE" and rates == [1e-4, 5e-4, 2e-3] and steps == [100, 200, 400]
    assert findings.grid(quick=True) == (tuple(rates), tuple(steps))
    measured = json.loads((ROOT / "docs" / "findings.json").read_text())["grid"]
    assert sorted(float(lr) for lr in measured) == rates, "docs/findings.json: remake it with findings --quick"
    assert all(sorted(int(n) for n in c) == steps for c in measured.values())
    params = sweep.notebook_parameters(ROOT / "notebooks" / "07_finding_the_sweet_spot.ipynb")
    offline_lists = {k: v for k, v in params.items() if k.startswith("OFFLINE") and isinstance(v, list)}
    assert len(offline_lists) == 2, offline_lists  # its offline rates and steps (whatever their names)
    for name, value in offline_lists.items():
        assert value in ([], rates if "RATE" in name else steps), f"notebook 07's {name}={value}: not the toy grid"


def test_notebook_07_quotes_the_findings_it_shows():
    """07's text quotes docs/findings.json's toy grid: the numbers must be the file's (regenerate both together)."""
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "07_finding_the_sweet_spot.ipynb", as_version=4)
    text = " ".join(" ".join(c.source for c in nb.cells if c.cell_type == "markdown").split())  # one space
    m = json.loads((ROOT / "docs" / "findings.json").read_text())
    grid = {float(lr): {int(n): s for n, s in c.items()} for lr, c in m["grid"].items()}
    lr_text = lambda lr: f"{lr:.0e}".replace("e-0", "e-")  # noqa: E731  (5e-4)
    pct = lambda v: f"{v:.0%}"  # noqa: E731
    (slr, sst), rates = m["sweet"], sorted(grid)
    sweet = grid[slr][sst]
    assert (f"LR {lr_text(slr)} × {sst} steps** (subject {pct(sweet['subject_fidelity'])}, new contexts "
            f"{pct(sweet['prompt_fidelity'])})") in text
    low = grid[rates[0]][max(grid[rates[0]])]
    assert f"LR {lr_text(rates[0])} is still learning at {max(grid[rates[0]])} steps (subject " \
           f"{pct(low['subject_fidelity'])})" in text
    hot = [s["prompt_fidelity"] for s in grid[rates[-1]].values()]
    assert f"LR {lr_text(rates[-1])} overfits from the first 100 steps (new contexts {pct(min(hot))} to " \
           f"{pct(max(hot))})" in text
    drifts = sorted(s["class_drift"] for c in grid.values() for s in c.values())
    first = grid[rates[0]][min(grid[rates[0]])]["class_drift"]
    assert f"class drift is {pct(drifts[1])} to {pct(drifts[-1])} in every cell but the first" in text
    assert f"({lr_text(rates[0])} × {min(grid[rates[0]])}: {pct(first)})" in text


def test_notebook_07_on_sd15_with_drive_puts_the_sweep_in_drive_and_cleans_best(monkeypatch, tmp_path):
    """07's parameters and derived cells, run as on Colab with a T4 and USE_DRIVE = True (Drive faked in tmp_path):
    the sweep's folder and the photos are in Drive, every run scores itself (EVAL_STEPS), and a finished run's
    model/ and best/ (2-4 GB each on SD 1.5) are deleted with its checkpoints unless KEEP_MODELS."""
    import nbformat

    import nbkit as nb
    from nbkit.env import colab, runtime

    drive = tmp_path / "drive" / "MyDrive"
    (drive / "nbkit" / "instance" / "my_dog").mkdir(parents=True)
    monkeypatch.setattr(runtime, "detect", lambda: runtime.Runtime("colab", "cuda", "Tesla T4", 1, 14.75, False))
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(colab, "mount_drive", lambda use=True, mountpoint=None: drive if use else None)
    monkeypatch.setattr(colab, "hub_cache_on_drive", lambda d, project=colab.PROJECT: d / project / "hf-cache")
    monkeypatch.chdir(tmp_path)
    cells = [c for c in nbformat.read(ROOT / "notebooks" / "07_finding_the_sweet_spot.ipynb", as_version=4).cells
             if c.cell_type == "code"]
    i = next(k for k, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    env: dict = {}
    exec(cells[i].source, env)
    env.update(USE_DRIVE=True, INSTANCE_DIR="my_dog", CLASS_NOUN="dog")
    exec(cells[i + 1].source, env)
    spec = env["spec"]
    assert env["setup"].model == runtime.SD15 and env["lr_key"] == "LEARNING_RATE"
    assert spec["output"] == str(drive / "nbkit" / "outputs" / "07_finding_the_sweet_spot")
    assert spec["fixed"]["INSTANCE_DIR"] == str(drive / "nbkit" / "instance" / "my_dog")
    assert spec["fixed"]["EVAL_STEPS"] == env["EVAL_STEPS"] > 0 and spec["fixed"]["EXPORT"] is False
    assert spec["cleanup"] == ["checkpoints", "model", "best"]
    assert set(spec["grid"]) == {"LEARNING_RATE", "MAX_TRAIN_STEPS"} and max(spec["grid"]["LEARNING_RATE"]) < 1e-5
    checked = nb.load_sweep(spec)  # notebook 01 has every parameter 07 sets
    assert checked.output == drive / "nbkit" / "outputs" / "07_finding_the_sweet_spot"
    env.update(KEEP_MODELS=True)
    exec(cells[i + 1].source, env)
    assert env["spec"]["cleanup"] == ["checkpoints"]
