"""One meaning per parameter name across the notebooks: every notebook's parameters cell checked against the one
table, nbkit/notebook/parameters.py PARAMETERS (name -> kind, meaning, the unit its comment must name)."""

import ast
import io
import tokenize
from pathlib import Path

import nbformat
import pytest

from nbkit.notebook import parameters as table

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if not p.name.startswith("_"))


def parameter_lines(path: Path) -> dict[str, tuple[object, str]]:
    """name -> (value, explanatory comment) of a notebook's parameters cell (literals only, as the house rule says)."""
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(cell.source).readline)
                if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(cell.source).body:
        (target,) = node.targets
        out[target.id] = (ast.literal_eval(node.value), table.explanation(comments.get(node.lineno, "")))
    return out


PARSED = {p.stem: parameter_lines(p) for p in NOTEBOOKS}


@pytest.mark.parametrize("stem", sorted(PARSED))
def test_names_are_in_the_table_with_its_kind_and_unit(stem):
    found = [msg for name, (value, comment) in PARSED[stem].items() for msg in table.problems(name, value, comment)]
    assert not found, f"{stem}:\n" + "\n".join(found)


def test_training_notebooks_have_preset_eval_steps_and_resume():
    assert set(table.TRAINING_NOTEBOOKS) <= set(PARSED), "a training notebook is missing"
    for stem in table.TRAINING_NOTEBOOKS:
        missing = [n for n in table.TRAINING_REQUIRED if n not in PARSED[stem]]
        assert not missing, f"{stem} has no {missing}"


def test_every_row_is_used_and_has_one_meaning():
    used = {n for params in PARSED.values() for n in params}
    assert set(table.PARAMETERS) == used, f"rows no notebook uses: {sorted(set(table.PARAMETERS) - used)}"
    for name, p in table.PARAMETERS.items():
        assert name.isupper() and p.meaning and p.kind, name
        assert ";" not in p.kind and all(k.strip() for k in p.kind.split("|")), name


def test_old_names_with_two_meanings_are_gone():
    """STEPS meant inference steps in 00/03 and training steps in 07; the pairs below said one thing twice."""
    gone = {"STEPS", "OFFLINE_STEPS", "NUM_SAMPLES", "COMPARE", "DREAMBOOTH_LEARNING_RATE",
            "OFFLINE_DREAMBOOTH_LEARNING_RATE"}
    used = {n for params in PARSED.values() for n in params}
    assert not gone & used and not gone & set(table.PARAMETERS)


def test_the_check_catches_contradictions():
    assert table.problems("SAMPLE_STEPS", 50, "inference steps per image") == []
    assert table.problems("SAMPLE_STEPS", [25, 50], "inference steps, the columns of the grid") == []
    assert table.problems("SAMPLE_STEPS", 400, "training steps of each run")  # the comment says another unit
    assert table.problems("MAX_TRAIN_STEPS", 2e-6, "optimizer steps")  # a float is not a step count
    assert table.problems("USE_DRIVE", 1, "on Colab: in Google Drive")  # an int is not a bool
    assert table.problems("STEPS", 30, "inference steps")  # not in the table
    assert table.problems("TEXT_ENCODER_STEPS", None, "stop after this many steps (None: all the way)") == []
    assert table.explanation('#@param {type:"integer"}  # optimizer steps') == "optimizer steps"
    assert table.explanation('#@param ["auto", "8gb"] {allow-input: true}  # memory preset') == "memory preset"
    assert table.explanation("# plain comment") == "plain comment"


def test_docs_table_is_the_table():
    doc = (ROOT / "docs" / "parameters.md").read_text()
    assert table.markdown() in doc, "docs/parameters.md is out of date: python -m nbkit.notebook.parameters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_colab_form_fields_and_papermill_agree(path):
    """The settings students change carry Colab's form marker (`#@param ...`) before their one comment, the others
    none; papermill still reads every default right and its injected values win."""
    import papermill as pm
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    for line in cell.source.splitlines():
        name, value = line.split("=", 1)[0].strip(), ast.literal_eval(line.split("=", 1)[1].split("  #", 1)[0])
        marker = table.colab_marker(name, value)
        comment = line.split("  #", 1)[1]
        if marker:
            assert line.split("  ", 1)[1].startswith(marker + "  # "), f"{path.stem}: {line!r} wants {marker!r}"
        else:
            assert "@param" not in comment, f"{path.stem}: {name} is not a form field in the table"
    assert any(table.colab_marker(n, v) for n, (v, _) in PARSED[path.stem].items()), "a form for students"
    parsed = pm.inspect_notebook(str(path))
    assert {n: ast.literal_eval(p["default"]) for n, p in parsed.items()} == \
        {n: v for n, (v, _) in PARSED[path.stem].items()}
    new = {"SMOKE": True, "OUTPUT_DIR": "elsewhere"}
    injected = parameterize_notebook(load_notebook_node(str(path)), new)  # as execute_notebook does
    ns: dict = {}
    for c in injected.cells:
        if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", [])):
            exec(c.source, ns)  # the parameters cell, then papermill's cell after it
    assert {k: ns[k] for k in new} == new and ns["MODEL"] == PARSED[path.stem]["MODEL"][0]
