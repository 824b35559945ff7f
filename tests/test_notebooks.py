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


# What each notebook must have written, beyond running without error.
EXPECTED = {
    "00_start_here": ["runtime.txt", "memory.png", "playground.png"],
    "01_dreambooth": ["model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors", "losses.json",
                      "validation/step_00004.png", "samples/after_000.png", "samples/before_000.png",
                      "run_manifest.json", "checkpoints/step_000004/checkpoint.json"],
    "05_textual_inversion": ["ti/model/learned_embeds.safetensors", "ti/a1111/zwx.safetensors", "ti/losses.json",
                             "ti/validation/step_00002.png", "samples/after_000.png", "samples/before_000.png",
                             "ti_dreambooth/model/model_index.json", "dreambooth/model/model_index.json",
                             "dreambooth_te/model/model_index.json", "compare.png"],
    "06_lora": ["lora/model/pytorch_lora_weights.safetensors", "lora/losses.json", "lora/validation/step_00002.png",
                "zwx_lora.safetensors", "scales.png", "samples/after_000.png", "samples/before_000.png",
                "dreambooth/model/model_index.json"],
}


def images_shown(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    import papermill as pm

    out = tmp_path / "out"
    executed = tmp_path / path.name
    pm.execute_notebook(str(path), str(executed), parameters={"SMOKE": True, "OUTPUT_DIR": str(out), "MODEL": "auto"},
                        cwd=str(tmp_path), progress_bar=False, kernel_name="python3")
    nb = load(executed)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert images_shown(nb) >= 2, "a notebook shows what it made"
    text = json.dumps([o.get("text", "") for c in nb.cells for o in c.get("outputs", [])])
    assert "OFFLINE model" in text, "the notebook says when it falls back to the offline model"
    for rel in EXPECTED.get(path.stem, []):
        assert (out / rel).exists(), rel
