"""What a notebook costs, said up front (nb.costs): T4 time and GPU memory planned (and labelled so), the offline
model's CPU time measured (with its date), disk and downloads priced, scoring as evaluations x images x steps, and
the Google Drive space checked against what is free."""

import ast
import types
from pathlib import Path

import nbformat
import pytest

from nbkit.env import colab
from nbkit.memory import speed
from nbkit.notebook import costs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if not p.name.startswith("_"))


def defaults(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(cell.source).body}


# Default offline runs not timed yet (`python -m benchmarks.offline_times NOTEBOOK` fills them in): none today.
NOT_YET_MEASURED: set[str] = set()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_is_priced_planned_and_measured(path):
    c = costs.estimate(path.stem, defaults(path))
    assert c.seconds > 0 and c.peak > 0 and all(s > 0 for _, s in c.time), c.time
    assert all(b >= 0 for _, b in c.disk) and any(b > 0 for _, b in c.downloads)
    text = str(c)
    assert "on a T4 (planned)" in text and "GiB peak (planned)" in text
    m = costs.measured(path.stem)  # docs/offline_times.json: every notebook's default offline run, timed
    if path.stem in NOT_YET_MEASURED:  # the cell says so instead of a time
        assert m is None and "not measured" in text, text
        return
    assert m is not None, f"{path.stem}: not measured; run python -m benchmarks.offline_times {path.stem}"
    assert m.seconds > 0 and m.written > 0 and m.date.startswith("20") and "-core" in m.machine
    assert f"measured {m.date}" in text and "(measured)" in text
    md = c._repr_markdown_()
    assert md.count("\n|") >= 3 and "planned" in md and "measured" in md
    if any("nb.costs(setup, globals())" in cell.source for cell in nbformat.read(path, as_version=4).cells):
        return
    pytest.fail(f"{path.stem}: no nb.costs(setup, globals()) cell near the top")


def test_dreambooth_prices_scoring_best_and_exports():
    p = defaults(ROOT / "notebooks" / "01_dreambooth.ipynb")
    c = costs.estimate("01_dreambooth", dict(p, EVAL_STEPS=100, MAX_TRAIN_STEPS=400, SAMPLE_STEPS=50))
    scoring = [s for what, s in c.time if "scoring, 5 evaluations x 24 images x 50 steps" in what]
    assert len(scoring) == 1 and scoring[0] > 0
    sizes = dict(c.disk)
    assert 3.5e9 < sizes["DreamBooth: best/ (the best-scoring model)"] < 4.5e9  # a full fp32 SD 1.5
    assert 3.5e9 < sizes["export/: fp16 diffusers folder + single-file .safetensors"] < 4.5e9  # 2 x ~2.1 GB
    assert any("CLIP" in w for w, _ in c.downloads) and any("DINO" in w for w, _ in c.downloads)
    quiet = costs.estimate("01_dreambooth", dict(p, EVAL_STEPS=0, EXPORT=False))
    assert not any("scoring" in w for w, _ in quiet.time)
    assert not any("best/" in w or "export" in w for w, _ in quiet.disk)
    assert quiet.seconds < c.seconds and quiet.disk_bytes < c.disk_bytes and quiet.peak < c.peak
    longer = costs.estimate("01_dreambooth", dict(p, MAX_TRAIN_STEPS=800))
    assert longer.seconds > costs.estimate("01_dreambooth", p).seconds


def test_lora_and_ti_are_small_on_disk():
    lora = costs.estimate("06_lora", dict(defaults(ROOT / "notebooks" / "06_lora.ipynb"), COMPARE_DREAMBOOTH=False))
    assert lora.disk_bytes < 0.1e9 and lora.peak < costs.estimate("01_dreambooth", defaults(
        ROOT / "notebooks" / "01_dreambooth.ipynb")).peak


def test_the_speed_model():
    one = speed.train_step_seconds("dreambooth", 1, 860_000_000)
    assert 0 < one < speed.train_step_seconds("dreambooth", 1, 860_000_000, checkpointing=True)
    assert one < speed.train_step_seconds("dreambooth", 2, 860_000_000)  # prior preservation: two pictures
    assert speed.train_step_seconds("lora", 1, 800_000) < one
    assert speed.sample_seconds(2, 100) == pytest.approx(2 * speed.sample_seconds(1, 100))
    assert speed.sample_seconds(1, 100) > speed.sample_seconds(1, 50) > 0


def test_the_counted_flops_are_sd15s():
    counted = speed.count()
    assert counted["unet"] == pytest.approx(speed.UNET_TFLOP, rel=0.01)
    assert counted["vae_decode"] == pytest.approx(speed.VAE_DECODE_TFLOP, rel=0.01)


def test_drive_space_says_needed_and_free(tmp_path, monkeypatch):
    ok = colab.drive_space(10**6, tmp_path)
    assert "0.0 GB there" in ok and "is free." in ok
    short = colab.drive_space(10**18, tmp_path)
    assert "but only" in short and "->" in short and "EXPORT = False" in short
    monkeypatch.setattr(colab, "DRIVE_MOUNTPOINT", str(tmp_path / "no-drive"))
    assert "shown once Drive is mounted" in colab.drive_space(10**9)


def test_costs_prints_the_drive_check_before_anything_is_written(tmp_path, capsys):
    setup = types.SimpleNamespace(notebook="06_lora", rt=types.SimpleNamespace(platform="colab"),
                                  files=types.SimpleNamespace(on_drive=True, root=tmp_path))
    p = dict(defaults(ROOT / "notebooks" / "06_lora.ipynb"), USE_DRIVE=True)
    c = costs.costs(setup, p)
    out = capsys.readouterr().out
    assert out.startswith("Google Drive: this notebook writes about") and "free" in out and c.drive in str(c)
    setup.rt.platform = "local"  # elsewhere USE_DRIVE changes nothing: no Drive line
    assert costs.costs(setup, p).drive == "" and capsys.readouterr().out == ""


def test_unknown_notebook_is_refused():
    with pytest.raises(ValueError, match="No cost model"):
        costs.estimate("99_new", {})


def test_an_unmeasured_notebook_says_so(monkeypatch):
    monkeypatch.setattr(costs, "OFFLINE_TIMES", "docs/no-such-file.json")
    c = costs.estimate("01_dreambooth", defaults(ROOT / "notebooks" / "01_dreambooth.ipynb"))
    assert c.offline is None and "not measured yet" in str(c)


def test_the_measuring_script_writes_what_costs_reads(tmp_path, monkeypatch):
    """benchmarks/offline_times.py's row format is what costs.measured reads (a fake run, no notebook executed)."""
    import json
    import subprocess

    from benchmarks import offline_times

    def fake_run(cmd, **kw):
        if cmd[0] == "git":
            return subprocess.CompletedProcess(cmd, 0, "abc1234\n", "")
        out = Path(cmd[cmd.index("OUTPUT_DIR") + 1])
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"x" * 1000)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(offline_times.subprocess, "run", fake_run)
    monkeypatch.setattr(offline_times, "OUT", tmp_path / "offline_times.json")
    offline_times.main(["01_dreambooth"])
    row = json.loads((tmp_path / "offline_times.json").read_text())["01_dreambooth"]
    assert row["written"] == 1000 and row["seconds"] >= 0 and row["cores"] >= 1
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "offline_times.json").write_text(json.dumps({"01_dreambooth": row}))
    monkeypatch.setattr("nbkit.paths.ROOT", tmp_path)
    m = costs.measured("01_dreambooth")
    assert m.written == 1000 and "-core" in m.machine
