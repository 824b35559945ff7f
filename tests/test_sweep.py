"""nbkit.notebook.sweep: a notebook over a grid with papermill, resumable, collected into a CSV and plots.

The runs execute tests/data/sweep_probe.ipynb (a real kernel per run): with TRAIN=False it writes made-up
losses/metrics/images at once, with TRAIN=True it fine-tunes the offline model for a step or two.
"""

import csv
import json
from pathlib import Path

import pytest

from nbkit.notebook import sweep

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "data" / "sweep_probe.ipynb"


def spec(tmp_path, grid, **fixed):
    return {"notebook": str(PROBE), "output": str(tmp_path / "sweep"), "fixed": fixed, "grid": grid}


@pytest.fixture
def counted(monkeypatch):
    """Counts papermill executions (by run folder); `counted.interrupt_at = n` raises KeyboardInterrupt at the n-th."""
    real = sweep._execute_notebook

    class Counter:
        calls: list[str] = []
        interrupt_at: int | None = None

    def wrapper(notebook, executed, parameters, cwd, kernel):
        Counter.calls.append(Path(parameters["OUTPUT_DIR"]).name)
        if Counter.interrupt_at == len(Counter.calls):
            raise KeyboardInterrupt
        return real(notebook, executed, parameters, cwd, "python3")

    Counter.calls = []
    monkeypatch.setattr(sweep, "_execute_notebook", wrapper)
    return Counter


def test_sweep_runs_every_point_and_collects(tmp_path, counted):
    grid = {"LEARNING_RATE": [1e-4, 1e-3], "MAX_TRAIN_STEPS": [2, 4]}
    report = sweep.run(spec(tmp_path, grid), progress=False)
    out = tmp_path / "sweep"
    assert len(counted.calls) == 4 and report.failed == {} and len(report.ran) == 4
    names = {"LEARNING_RATE-0.0001__MAX_TRAIN_STEPS-2", "LEARNING_RATE-0.0001__MAX_TRAIN_STEPS-4",
             "LEARNING_RATE-0.001__MAX_TRAIN_STEPS-2", "LEARNING_RATE-0.001__MAX_TRAIN_STEPS-4"}
    assert {p.name for p in (out / "runs").iterdir()} == names
    for name in names:
        rec = json.loads((out / "runs" / name / "run.json").read_text())
        assert rec["status"] == "ok" and rec["seconds"] > 0 and rec["error"] is None
        assert rec["parameters"] == rec["point"] and set(rec["point"]) == set(grid)
        executed = json.loads((out / "runs" / name / "sweep_probe.ipynb").read_text())  # the executed notebook
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    by = {(float(r["LEARNING_RATE"]), int(r["MAX_TRAIN_STEPS"])): r for r in rows}
    for (lr, steps), r in by.items():  # the probe's made-up numbers, read back from losses.json / metrics.json
        assert int(r["steps"]) == steps == int(r["eval_step"])
        assert float(r["subject_fidelity"]) == pytest.approx(min(1.0, lr * 1e3 * steps / 10))
        assert r["image"] == f"validation/step_{steps:05d}.png"
    assert report.rows == sweep.collect(out, plots=False)
    for png in ("final.png", "curves.png", "images.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert json.loads((out / "sweep.json").read_text())["grid"] == grid


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, counted):
    s = spec(tmp_path, {"LEARNING_RATE": [1e-4, 1e-3], "MAX_TRAIN_STEPS": [2, 3]})
    counted.interrupt_at = 3
    with pytest.raises(KeyboardInterrupt):
        sweep.run(s, progress=False)
    runs = sweep.load_spec(s).runs()
    assert [r.status for r in runs] == ["ok", "ok", "interrupted", "todo"]
    done = {r.name: (r.folder / "run.json").stat().st_mtime_ns for r in runs[:2]}
    done_nb = {r.name: (r.folder / "sweep_probe.ipynb").stat().st_mtime_ns for r in runs[:2]}
    # a run killed hard (runtime lost) leaves status "running": it counts as not finished either
    counted.calls.clear()
    counted.interrupt_at = None
    report = sweep.run(s, progress=False)
    assert counted.calls == [runs[2].name, runs[3].name], "only the unfinished runs execute"
    assert sorted(report.skipped) == sorted(done)
    assert {r.name: (r.folder / "run.json").stat().st_mtime_ns for r in runs[:2]} == done
    assert {r.name: (r.folder / "sweep_probe.ipynb").stat().st_mtime_ns for r in runs[:2]} == done_nb
    assert [r.status for r in runs] == ["ok"] * 4
    assert json.loads((runs[2].folder / "run.json").read_text())["attempts"] == 2

    rec = json.loads((runs[1].folder / "run.json").read_text())
    (runs[1].folder / "run.json").write_text(json.dumps({**rec, "status": "running"}))
    counted.calls.clear()
    sweep.run(s, progress=False)
    assert counted.calls == [runs[1].name]


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, counted, capsys):
    s = spec(tmp_path, {"FAIL": [True, False]})
    with pytest.raises(sweep.SweepError, match="1 failed"):
        sweep.run(s, progress=False)
    assert len(counted.calls) == 2, "the run after the failure still ran"
    failed, ok = sweep.load_spec(s).runs()
    rec = json.loads((failed.folder / "run.json").read_text())
    assert rec["status"] == "failed" and "RuntimeError: this run fails on purpose" in rec["error"]
    assert (failed.folder / "sweep_probe.ipynb").exists(), "the executed notebook shows where it failed"
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [r["status"] for r in rows] == ["failed", "ok"] and "on purpose" in rows[0]["error"]
    assert "FAILED FAIL-true" in capsys.readouterr().out
    counted.calls.clear()
    assert sweep.main(["run", str(_write_yaml(tmp_path, s))]) == 1, "the command exits non-zero"
    assert counted.calls == [failed.name], "a failed run runs again; the finished one is skipped"


def test_sweep_of_real_training_on_the_offline_model(tmp_path):
    """A real fine-tuning run through the sweep (2 steps on the offline model): the UNet moved, the text encoder
    did not, the losses were logged and collected. (Notebook 07 sweeps notebook 01 itself, in test_notebooks.)"""
    import math

    import torch
    from safetensors.torch import load_file

    from nbkit.models.offline import offline_model_dir

    report = sweep.run(spec(tmp_path, {"MAX_TRAIN_STEPS": [2]}, TRAIN=True, LEARNING_RATE=1e-3), progress=False)
    assert not report.failed and len(report.rows) == 1
    row = report.rows[0]
    assert row["status"] == "ok" and row["steps"] == 2 and math.isfinite(row["loss"]) and row["lr"] == 1e-3
    run_dir = tmp_path / "sweep" / "runs" / row["run"]
    assert (run_dir / row["image"]).is_file() and row["image"] == "validation/step_00002.png"
    changed = {}
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        base, tuned = load_file(offline_model_dir() / rel), load_file(run_dir / "model" / rel)
        changed[rel.split("/")[0]] = any(not torch.equal(base[k], tuned[k]) for k in base)
    assert changed == {"unet": True, "text_encoder": False}
    assert (tmp_path / "sweep" / "images.png").exists()


def _write_yaml(tmp_path, data) -> Path:
    import yaml

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("text, message", [
    ("notebook: [unclosed", "not valid YAML"),
    ("- a list", "expected a mapping"),
    (f"notebook: {PROBE}\noutput: o\n", "grid is missing"),
    (f"notebook: {PROBE}\noutput: o\ngrid: {{LEARNING_RATE: 1e-4}}\n", "single value belongs in fixed"),
    (f"notebook: {PROBE}\noutput: o\ngrid: {{LEARNING_RATE: [1e-4, 1e-4]}}\n", "listed twice"),
    (f"notebook: {PROBE}\noutput: o\nfixed: {{FAIL: true}}\ngrid: {{FAIL: [true]}}\n", "both in fixed and in grid"),
    (f"notebook: {PROBE}\noutput: o\ngrid: {{OUTPUT_DIR: [a, b]}}\n", "set by the sweep"),
    (f"notebook: {PROBE}\noutput: o\ngrids: {{FAIL: [true]}}\n", "unknown keys ['grids']"),
    ("notebook: notebooks/nope.ipynb\noutput: o\ngrid: {A: [1]}\n", "not found"),
    (f"notebook: {PROBE}\noutput: o\ngrid: {{LEARNIN_RATE: [1e-4], MAX_TRAIN_STEPS: [2]}}\n",
     "has no parameter LEARNIN_RATE"),
    (f"notebook: {PROBE}\noutput: o\ngrid: {{MAX_TRAIN_STEPS: [2.5]}}\n", "expected a whole number"),
    (f"notebook: {PROBE}\noutput: o\nfixed: {{TRAIN: yes please}}\ngrid: {{MAX_TRAIN_STEPS: [2]}}\n",
     "expected true or false"),
])
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, text, message, counted):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(sweep.SweepError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sweep.run(p, output=tmp_path / "out", progress=False)
    assert counted.calls == [] and not (tmp_path / "out").exists()
    assert sweep.main([str(p), "--output", str(tmp_path / "out")]) == 2


def test_yaml_reads_learning_rates_as_numbers_and_names_are_stable(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(f"notebook: {PROBE}\ngrid: {{LEARNING_RATE: [1e-6, 2.5e-6, 1.0e-5]}}\n")
    s = sweep.load_spec(p)
    assert s.grid["LEARNING_RATE"] == [1e-6, 2.5e-6, 1e-5]
    assert s.output == (Path.cwd() / "outputs" / "sweeps" / "s").resolve(), "default output: outputs/sweeps/<file>"
    assert [r.name for r in s.runs()] == ["LEARNING_RATE-1e-06", "LEARNING_RATE-2.5e-06", "LEARNING_RATE-1e-05"]
    assert sweep.run_name({"A": True, "B": "a photo/of x"}) == "A-true__B-a_photo_of_x"
    long = sweep.run_name({"PROMPT": "x" * 300})
    assert len(long) <= 120 and long == sweep.run_name({"PROMPT": "x" * 300})


def test_changed_fixed_parameters_are_refused(tmp_path, counted):
    s = spec(tmp_path, {"MAX_TRAIN_STEPS": [2]}, LEARNING_RATE=1e-4)
    sweep.run(s, progress=False)
    s["fixed"]["LEARNING_RATE"] = 1e-3
    with pytest.raises(sweep.SweepError, match="other parameters.*LEARNING_RATE: 0.0001 -> 0.001"):
        sweep.run(s, progress=False)
    assert len(counted.calls) == 1


def test_cli_dry_run_and_collect(tmp_path, counted, capsys):
    s = spec(tmp_path, {"LEARNING_RATE": [1e-4, 1e-3]})
    p = _write_yaml(tmp_path, s)
    assert sweep.main([str(p), "--dry-run", "--set", "MAX_TRAIN_STEPS=3"]) == 0
    out = capsys.readouterr().out
    assert "2 runs of sweep_probe.ipynb, 2 to run" in out and "'MAX_TRAIN_STEPS': 3" in out
    assert counted.calls == [] and not (tmp_path / "sweep" / "runs").exists()
    from nbkit import cli

    # python -m nbkit sweep
    assert cli.main(["sweep", str(p), "--dry-run"]) == 0 and "2 to run" in capsys.readouterr().out
    assert sweep.main(["run", str(p), "--set", "MAX_TRAIN_STEPS=3"]) == 0
    assert len(counted.calls) == 2
    (tmp_path / "sweep" / "results.csv").unlink()
    capsys.readouterr()
    assert sweep.main(["collect", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out  # the table, then the pick: the probe has no step 0, so no base-model scores
    assert "Sweet spot: LEARNING_RATE = 0.001, 3 steps" in out and "Fallback: no base-model prompt_fidelity" in out
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [int(r["steps"]) for r in rows] == [3, 3] and len(counted.calls) == 2
    assert sweep.main(["collect", str(tmp_path)]) == 2  # not a sweep folder: a clear error


def test_example_sweeps_name_real_notebook_parameters():
    """Every configs/sweeps/*.yaml loads and its parameters exist in its notebook (papermill.inspect_notebook)."""
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        s = sweep.load_spec(f)  # raises on unknown parameters or wrong types
        assert s.notebook.parent == ROOT / "notebooks" and len(s.points()) >= 2, f.name


def test_collect_reads_nested_runs_failures_and_after_the_fact_scores(tmp_path):
    """Hand-made run folders (no kernel): a notebook that trains two models (like 02) gives prefixed columns;
    a failed run is a row with its error; score() adds metrics.json to finished runs only."""
    from PIL import Image

    out = tmp_path / "sw"
    for lr, status in ((1e-6, "ok"), (2e-6, "ok"), (5e-6, "failed")):
        point = {"LEARNING_RATE": lr}
        run_dir = out / "runs" / sweep.run_name(point)
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"status": status, "parameters": point, "point": point,
                                                      "seconds": 1.5, "error": "boom" if status == "failed" else None}))
        if status == "failed":
            continue
        for sub in ("without_prior", "with_prior"):
            log = [{"step": s, "loss": lr * 1e5 / s, "lr": lr,
                    **({"instance": 0.1, "prior": 0.2} if sub == "with_prior" else {})}
                   for s in (1, 2, 3)]
            (run_dir / sub / "validation").mkdir(parents=True)
            (run_dir / sub / "losses.json").write_text(json.dumps(log))
            Image.new("RGB", (8, 8), "red").save(run_dir / sub / "validation" / "step_00003.png")
    rows = sweep.collect(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"] and rows[2]["error"] == "boom"
    assert rows[0]["with_prior/steps"] == rows[0]["without_prior/steps"] == 3
    assert rows[0]["with_prior/loss_prior"] == 0.2 and "without_prior/loss_prior" not in rows[0]
    assert rows[1]["without_prior/loss"] == pytest.approx(2e-6 * 1e5 / 3)
    assert rows[0]["image"] == "with_prior/validation/step_00003.png" and rows[2]["image"] == ""
    assert (out / "images.png").exists() and (out / "curves.png").exists()

    seen = []
    assert sweep.score(out, lambda run_dir, params: seen.append(params)
                       or {"subject_fidelity": params["LEARNING_RATE"] * 1e5}) == 2
    assert sweep.score(out, lambda run_dir, params: 1 / 0) == 0, "runs measured before are not measured again"
    rows = sweep.collect(out, plots=False)
    assert [r.get("subject_fidelity") for r in rows] == [pytest.approx(0.1), pytest.approx(0.2), None]
    assert rows[0]["eval_step"] == 3 and sweep.final_columns(rows)[0] == "subject_fidelity"
    table = sweep.markdown(rows, ["LEARNING_RATE", "status", "subject_fidelity"])
    assert table.splitlines()[2] == "| 1e-06 | ok | 0.1 |"
    try:
        import pandas  # noqa: F401  (not a dependency of the kit; Colab has it)
    except ImportError:
        return
    assert len(sweep.collect(out, plots=False, as_frame=True)) == 3


def test_a_notebook_of_the_kit_is_found_from_any_folder(tmp_path, monkeypatch):
    from nbkit.notebook import sweep_spec

    monkeypatch.chdir(tmp_path)  # a sweep started elsewhere still finds notebooks/ of the kit
    assert sweep_spec._resolve_notebook("notebooks/01_dreambooth.ipynb", None).is_file()
