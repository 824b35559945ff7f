"""Every notebook in notebooks/ (discovered; `_`-prefixed skipped): house rules, then a papermill run in smoke mode."""

import ast
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if not p.name.startswith("_"))
IDS = [p.stem for p in NOTEBOOKS]


def load(path):
    return nbformat.read(path, as_version=4)


def params_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_house_rules(path):
    nb = load(path)
    assert path.stem[:2].isdigit() and path.stem[2] == "_", "name notebooks NN_topic.ipynb"
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source, "first cell: Colab badge"
    assert any("google.colab" in c.source for c in nb.cells[:3] if c.cell_type == "code"), "Colab-only install cell"
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, "store notebooks without outputs"
            assert "input(" not in c.source, "input() blocks a headless run"
    src = params_cell(nb).source
    tree = ast.parse(src)
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"parameters cell holds assignments only: {ast.unparse(node)}"
        ast.literal_eval(node.value)  # literals only
    for line in src.splitlines():
        if line.strip():
            assert "  # " in line, f"one comment per parameter: {line!r}"
    names = {t.id for n in tree.body for t in n.targets}
    assert {"SMOKE", "OUTPUT_DIR", "MODEL"} <= names
    import papermill as pm

    parsed = pm.inspect_notebook(str(path))
    assert set(parsed) == names, "papermill must parse every parameter (no quotes inside the comments)"
    assert all(p["help"] for p in parsed.values()), "every parameter has a comment papermill can show"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_opens_on_a_gpu_runtime(path):
    """Opened from its badge, a notebook asks Colab for a T4 GPU and Kaggle for a GPU."""
    meta = load(path).metadata
    assert meta.get("accelerator") == "GPU", "Colab: metadata.accelerator = 'GPU'"
    assert meta.get("colab", {}).get("gpuType") == "T4", "Colab: metadata.colab.gpuType = 'T4'"
    assert meta.get("kaggle", {}).get("accelerator", "").startswith("gpu"), "Kaggle: metadata.kaggle.accelerator"
    assert meta.get("kernelspec", {}).get("name") == "python3"


# The take-home files of each method (notebooks' "Take it home" section, nbkit.export.takehome), in OUTPUT_DIR/export.
TAKE_HOME = {
    "dreambooth": ["export/model_index.json", "export/unet/diffusion_pytorch_model.safetensors",
                   "export/text_encoder/model.safetensors", "export/zwx_dreambooth.safetensors"],
    "textual_inversion": ["export/learned_embeds.safetensors", "export/zwx.safetensors"],
    "lora": ["export/pytorch_lora_weights.safetensors", "export/zwx_lora.safetensors"],
}
METHOD = {"01_dreambooth": "dreambooth", "02_prior_preservation": "dreambooth", "03_schedulers": "dreambooth",
          "04_text_encoder": "dreambooth", "05_textual_inversion": "textual_inversion", "06_lora": "lora",
          "08_sdxl_lora": "lora"}

# What each notebook must have written, beyond running without error (glob patterns allowed).
EXPECTED = {
    "00_start_here": ["runtime.txt", "memory.png", "playground.png"],
    "01_dreambooth": ["model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors", "losses.json",
                      "validation/step_00004.png", "samples/after_000.png", "samples/before_000.png",
                      "run_manifest.json", "checkpoints/step_000004/checkpoint.json"],
    "05_textual_inversion": ["ti/model/learned_embeds.safetensors", "ti/losses.json",
                             "ti/validation/step_00002.png", "samples/after_000.png", "samples/before_000.png",
                             "ti_dreambooth/model/model_index.json", "dreambooth/model/model_index.json",
                             "dreambooth_te/model/model_index.json", "compare.png", "ti/metrics.json"],
    "06_lora": ["lora/model/pytorch_lora_weights.safetensors", "lora/losses.json", "lora/validation/step_00002.png",
                "zwx_lora.safetensors", "scales.png", "samples/after_000.png", "samples/before_000.png",
                "dreambooth/model/model_index.json", "lora/metrics.json"],
    "02_prior_preservation": ["class_images/a_photo_of_a_star-*/class_0000[0-3].png",
                              "without_prior/model/model_index.json",
                              "with_prior/model/unet/diffusion_pytorch_model.safetensors", "with_prior/losses.json",
                              "comparison_instance.png", "comparison_class.png", "drift.json",
                              "without_prior/metrics.json", "with_prior/metrics.json"],
    "03_schedulers": ["run/model/model_index.json", "scheduler_grid.png", "scheduler_grid.json",
                      "scheduler_grid/ddim_003_seed0.png", "scheduler_grid/reference_ddim_*_seed0.png",
                      "run/metrics.json"],
    "04_text_encoder": ["frozen_text_encoder/model/text_encoder/model.safetensors",
                        "trained_text_encoder/model/text_encoder/model.safetensors", "comparison.png", "memory.json",
                        "text_encoder_shift.json", "frozen_text_encoder/metrics.json",
                        "trained_text_encoder/metrics.json"],
    "07_finding_the_sweet_spot": ["sweep.json", "results.csv", "final.png", "curves.png", "images.png",
                                  "runs/*/run.json", "runs/*/01_dreambooth.ipynb", "runs/*/losses.json",
                                  "runs/*/metrics.json", "runs/*/validation/step_00002.png",
                                  "runs/*/model/model_index.json", "runs/*/best/best.json"],
    "08_sdxl_lora": ["model/pytorch_lora_weights.safetensors", "zwx_sdxl_lora.safetensors", "losses.json",
                     "validation/step_00002.png", "samples/before_000.png", "samples/after_000.png", "sdxl_lora.json"],
}


def _check_prior(out):
    """The three runs on the same steps; only the prior runs logged the two loss terms; four class images; only run 3
    (prior + text encoder) changed the text encoder."""
    from safetensors.torch import load_file

    plain = json.loads((out / "without_prior" / "losses.json").read_text())
    prior = json.loads((out / "with_prior" / "losses.json").read_text())
    both = json.loads((out / "with_prior_and_text_encoder" / "losses.json").read_text())
    assert len(plain) == len(prior) == len(both) == 4
    assert all("prior" not in r for r in plain) and all({"instance", "prior"} <= set(r) for r in prior + both)
    te = "model/text_encoder/model.safetensors"
    same = lambda a, b: all(a[k].equal(b[k]) for k in b)  # noqa: E731
    assert same(load_file(out / "with_prior" / te), load_file(out / "without_prior" / te))
    assert not same(load_file(out / "with_prior_and_text_encoder" / te), load_file(out / "with_prior" / te))
    assert len(list(out.glob("class_images/*/class_*.png"))) == 4
    drift = json.loads((out / "drift.json").read_text())
    assert set(drift) == {"without prior", "with prior", "prior + text encoder"}
    assert all(0 <= v <= 1 for d in drift.values() for v in d.values())
    scores = json.loads((out / "scores.json").read_text())  # the toy judge's numbers, before and after each run
    assert set(scores) == {"before", "without prior", "with prior", "prior + text encoder"}
    assert all(0 <= s[k] <= 1 for s in scores.values() for k in ("subject_fidelity", "prompt_fidelity", "class_drift"))


def _check_grid(out):
    """The scheduler grid has every cell (all nine schedulers x the smoke steps), each with its image, time and
    noise measures against the same seeds' DDIM reference pictures."""
    grid = json.loads((out / "scheduler_grid.json").read_text())
    assert set(grid["schedulers"]) == {"pndm", "lms", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras",
                                       "euler_karras", "unipc"}
    assert grid["reference"]["scheduler"] == "ddim" and grid["reference"]["steps"] > max(grid["steps"])
    assert all((out / f).exists() for f in grid["reference"]["images"])
    cells = {(c["scheduler"], c["steps"]): c for c in grid["cells"]}
    assert set(cells) == {(s, n) for s in grid["schedulers"] for n in grid["steps"]} and len(grid["steps"]) >= 2
    assert all(c["seconds_per_image"] > 0 and len(c["images"]) == len(grid["seeds"]) for c in cells.values())
    assert all(0 <= c["high_frequency"] < 1 and 0 < c["distance"] <= 1 for c in cells.values())
    assert all((out / f).exists() for c in cells.values() for f in c["images"])


def _check_text_encoder(out):
    """Only the second run changed the text encoder; both changed the UNet; the memory figures are there."""
    import torch
    from safetensors.torch import load_file

    from nbkit.models.offline import offline_model_dir

    base = offline_model_dir()
    te, unet = "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"
    load = lambda run, rel: load_file(out / run / "model" / rel)  # noqa: E731
    ref_te, ref_unet = load_file(base / te), load_file(base / unet)
    eq = lambda a, b: all(torch.equal(a[k], b[k]) for k in b)  # noqa: E731
    assert eq(load("frozen_text_encoder", te), ref_te) and not eq(load("trained_text_encoder", te), ref_te)
    assert not eq(load("frozen_text_encoder", unet), ref_unet) and not eq(load("trained_text_encoder", unet), ref_unet)
    mem = json.loads((out / "memory.json").read_text())
    assert {"sd15", "this_model", "measured_peak_bytes"} <= set(mem)
    labels = [b["label"] for b in mem["sd15"]]
    assert any("8-bit" in label and "text encoder" in label for label in labels)
    shift = json.loads((out / "text_encoder_shift.json").read_text())
    assert len(shift) == 4 and max(shift.values()) > 0


def _check_sweep(out):
    """Two runs of notebook 01 at the lowest and the highest rate of the kit's toy grid, both finished, collected with
    the scores they wrote while training; their step 0 (the base model, the baseline) scored alike; the pick said."""
    import csv

    from nbkit.notebook.sweep_spec import toy_grid

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    rates = toy_grid()["OFFLINE_LEARNING_RATE"]
    assert {float(r["OFFLINE_LEARNING_RATE"]) for r in rows} == {rates[0], rates[-1]}
    assert all(r["steps"] == "2" and r["eval_step"] == "2" for r in rows)
    assert all(0 <= float(r[m]) <= 1 for r in rows for m in ("subject_fidelity", "prompt_fidelity", "class_drift"))
    assert not list(out.glob("runs/*/checkpoints")), "checkpoints of finished runs are cleaned up"
    firsts = [json.loads(p.read_text())[0] for p in sorted(out.glob("runs/*/metrics.json"))]
    assert len(firsts) == 2 and all(f["step"] == 0 and f["scorer"] == "toy judge" for f in firsts)
    keys = ("subject_fidelity", "prompt_fidelity", "class_drift")
    assert all(firsts[0][k] == firsts[1][k] for k in keys), "one base model, scored the same way in both runs"
    executed = load(out.parent / "07_finding_the_sweet_spot.ipynb")
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "the base model, scored by the toy judge at step 0 of 2 runs" in text
    assert "Sweet spot: OFFLINE_LEARNING_RATE = " in text or "No pick: no run has a higher balance than" in text
    assert "| base model | 0 | step 0 |" in json.dumps(
        [o.get("data", {}).get("text/markdown", "") for c in executed.cells for o in c.get("outputs", [])])


for _nb, _method in METHOD.items():
    EXPECTED[_nb] = EXPECTED[_nb] + TAKE_HOME[_method]


def check_take_home(out, text):
    """The exports are in the formats of the method, in fp16 where that applies, and each reloaded to the same
    picture as the trained model (the notebook prints the check)."""
    from safetensors import safe_open

    for path in out.glob("export/**/*.safetensors"):
        if path.name in ("learned_embeds.safetensors", "zwx.safetensors"):  # embeddings stay fp32 (a few KB)
            continue
        with safe_open(str(path), "pt") as f:  # floats in fp16 (a kohya file keeps its scalar .alpha in fp32)
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".alpha")}
        assert dtypes <= {"F16", "I64"} and "F16" in dtypes, (path, dtypes)
    assert text.count("reloaded: same picture") >= 2 and "DIFFERENT" not in text


def _check_sdxl(out):
    """The tiny SDXL (offline): what its UNet received was SDXL's (both encoders side by side, the pooled embedding,
    the time_ids); only adapters trained and no base weight moved; both files hold all three parts (diffusers:
    unet/text_encoder/text_encoder_2; kohya: lora_unet_/lora_te1_/lora_te2_, SDXL metadata) and their sizes are the
    files'; unscored; the T4 plan is SDXL's at 1024 px, larger than SD 1.5's."""
    from safetensors import safe_open

    facts = json.loads((out / "sdxl_lora.json").read_text())
    assert facts["model"] == "tiny-sdxl"
    ins = facts["inputs"]
    assert set(ins["encoder_widths"]) == {"text_encoder", "text_encoder_2"}
    assert ins["hidden_states"] == [77, sum(ins["encoder_widths"].values())]
    assert len(ins["text_embeds"]) == 1 and ins["time_ids"] == [64, 64, 0, 0, 64, 64]
    assert facts["adapters_only"] is True and facts["base_weights_max_change"] == 0.0
    assert facts["parts"] == {"diffusers": ["text_encoder", "text_encoder_2", "unet"], "kohya": ["te1", "te2", "unet"]}
    kohya, diffusers = out / "zwx_sdxl_lora.safetensors", out / "model" / "pytorch_lora_weights.safetensors"
    assert facts["file_bytes"] == {"diffusers": diffusers.stat().st_size, "kohya": kohya.stat().st_size}
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert {k.split("_")[1] for k in f.keys()} == {"unet", "te1", "te2"}
    assert not (out / "metrics.json").exists()  # the tiny SDXL is not scored (random weights)
    planned = facts["planned_t4_gib"]
    assert planned["sdxl"] > 1.5 * planned["sd15"] > 0
    assert facts["planned_t4_fits"]["sdxl"], "the notebook says the planner fits SDXL LoRA on a T4"


CHECKS = {"02_prior_preservation": _check_prior, "08_sdxl_lora": _check_sdxl, "07_finding_the_sweet_spot": _check_sweep,
          "03_schedulers": _check_grid, "04_text_encoder": _check_text_encoder}


def images_shown(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


SMOKE_EXTRA = {"03_schedulers": {"EXPORT": True}}  # off by default there (an overfit model): still checked here


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    import papermill as pm

    out = tmp_path / "out"
    executed = tmp_path / path.name
    params = {"SMOKE": True, "OUTPUT_DIR": str(out), "MODEL": "auto", **SMOKE_EXTRA.get(path.stem, {})}
    pm.execute_notebook(str(path), str(executed), parameters=params,
                        cwd=str(tmp_path), progress_bar=False, kernel_name="python3")
    nb = load(executed)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert images_shown(nb) >= 2, "a notebook shows what it made"
    text = json.dumps([o.get("text", "") for c in nb.cells for o in c.get("outputs", [])])
    assert "OFFLINE model" in text, "the notebook says when it falls back to the offline model"
    for rel in EXPECTED.get(path.stem, []):
        assert list(out.glob(rel)), rel
    if path.stem in METHOD:
        check_take_home(out, text)
    if path.stem in CHECKS:
        CHECKS[path.stem](out)


def _curated_api_problems(source: str, allowed: set[str]) -> list[str]:
    """What in one code cell goes around `import nbkit as nb` + `nb.<name in __all__>`, or calls a private name."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nbkit":
            problems.append(f"`{ast.unparse(node)}`: use `import nbkit as nb` and nb.<name>")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "nbkit" and (a.name, a.asname) != ("nbkit", "nb"):
                    problems.append(f"`{ast.unparse(node)}`: use `import nbkit as nb`")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in ("nb", "nbkit") and node.attr not in allowed:
                problems.append(f"`{node.value.id}.{node.attr}` is not in nbkit.__all__")
            if node.attr.startswith("_") and not (node.attr.startswith("__") and node.attr.endswith("__")):
                problems.append(f"`.{node.attr}` is private")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("_"):
            problems.append(f"`{node.func.id}()` is private")
    return problems


def test_curated_api_check_catches_what_it_should():
    allowed = {"train"}
    assert _curated_api_problems("import nbkit as nb\nnb.train(cfg)", allowed) == []
    bad = ["from nbkit import colab", "from nbkit.notebook.widgets import upload_box", "import nbkit",
           "import nbkit.export.formats", "nbkit.data.images.load_folder(x)", "nb.export.human_size(p)", "nb.hidden()",
           "x._repr_markdown_()", "_helper()"]
    for src in bad:
        assert _curated_api_problems(src, allowed), src


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_uses_only_the_curated_api(path):
    """Notebooks survive a package restructure: `import nbkit as nb`, then only names of nbkit.__all__, and nothing
    private; the first code cell after the parameters is a short nb.setup(...) cell."""
    import nbkit

    allowed = set(nbkit.__all__)
    nb = load(path)
    problems = [f"cell {i}: {p}" for i, c in enumerate(nb.cells) if c.cell_type == "code"
                for p in _curated_api_problems(c.source, allowed)]
    assert not problems, "\n".join(problems)
    code = [c for c in nb.cells if c.cell_type == "code"]
    derived = code[code.index(params_cell(nb)) + 1].source
    assert "import nbkit as nb" in derived and "nb.setup(" in derived, "the derived-settings cell calls nb.setup"
    assert "offline_model_dir" not in derived and "OFFLINE_RESOLUTION" not in derived, "setup decides what is small"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("platform", ["colab", "kaggle"])
def test_install_cell_is_safe_to_run_twice(path, platform, monkeypatch):
    """Colab/Kaggle's install cell, run twice as students do: one clone, the same absolute folder both times (a
    second run used to clone inside the first clone and move the relative output folders), torch never touched."""
    import os
    import subprocess
    import sys
    import types

    nb = json.loads(path.read_text())
    cell = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"
                and "".join(c["source"]).startswith("# Colab / Kaggle only"))
    calls, made, cwd = [], set(), []
    if platform == "colab":
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
        monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")

    def run(cmd, check=False):
        calls.append(cmd)
        if cmd[:2] == ["git", "clone"]:
            made.add(os.path.join(cmd[-1], "nbkit"))  # what the clone brings

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os.path, "exists", lambda p: p in made)
    monkeypatch.setattr(os, "chdir", cwd.append)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for _ in range(2):
        exec(compile(cell, str(path), "exec"), {})
    clones = [c for c in calls if c[:2] == ["git", "clone"]]
    assert len(clones) == 1 and len(set(cwd)) == 1 and os.path.isabs(cwd[0]), (clones, cwd)
    assert sys.path.count(cwd[0]) == 1
    assert not any("torch" in arg for c in calls for arg in c if "requirements" not in arg)


def test_the_overfit_scheduler_notebook_does_not_export_by_default():
    """Notebook 03's model is overfit on purpose: its take-home files are off unless asked for."""
    tree = ast.parse(params_cell(load(ROOT / "notebooks" / "03_schedulers.ipynb")).source)
    values = {t.id: ast.literal_eval(n.value) for n in tree.body for t in n.targets}
    assert values["EXPORT"] is False
