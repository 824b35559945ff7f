"""The one table of the notebooks' parameter names: each name has one meaning and one kind in every notebook.

A notebook's `parameters` cell may only use names listed here (tests/test_parameter_names.py parses every
notebook's cell and checks each line against this table: the name is here, its value has the kind given, and its
comment names the unit the table gives in `says`). Adding a parameter to a notebook means adding its row here.

Conventions: `OFFLINE_X` is the small offline model's value of `X` (`setup.pick(OFFLINE_X, X)`); `*_STEPS` names
say what they count: `MAX_TRAIN_STEPS` optimizer steps of a run, `SAMPLE_STEPS` inference steps per image,
`VALIDATION_STEPS` / `EVAL_STEPS` / `CHECKPOINTING_STEPS` "every this many training steps"; `DB_*` are the
comparison DreamBooth runs of a notebook whose main run is another method; a list value (07's grid, 03's columns)
means "one run / one column per value".

Colab forms: the rows with `form=True` are the settings a student changes; in every notebook their line carries
Colab's form marker before its one explanatory comment, `MAX_TRAIN_STEPS = 400  #@param {type:"integer"}  # ...`
(`colab_marker` writes it). The comment goes after the marker, as form notebooks in the wild write it: Colab takes
the field's value from between `=` and `#@param` (a comment before the marker would land in the value) and leaves
the rest of the line alone; papermill reads the value before the first `#` and still injects its own cell after
this one (both checked in tests/test_parameter_names.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    kind: str  # "int", "float", "str", "bool", "list[int]", "list[float]", "list[str]", or two joined by " | "
    meaning: str  # the one meaning, with its unit
    says: tuple[str, ...] = ()  # every notebook's comment for it contains one of these (its unit, in words)
    form: bool = False  # a setting students change: a Colab form field (`#@param`) in every notebook
    choices: tuple[str, ...] = ()  # the form's dropdown (with `open`, other values can be typed too)
    open: bool = False


STEPS_EVERY = ("every",)
TRAINING_STEPS = ("optimizer steps", "training steps")

PARAMETERS: dict[str, Param] = {
    # --- the model, the subject, the folders
    "MODEL": Param("str", "the base model: auto, a hub id, a local diffusers folder, or the offline one "
                          "(08: tiny-sdxl)", ("auto",), form=True),
    "VAE": Param("str", "08: another VAE for the base model (empty: its own)"),
    "FINETUNED_MODEL": Param("str", "a fine-tuned model folder to use instead of training one (empty: train here)"),
    "INSTANCE_DIR": Param("str", "the folder of 3-10 photos of your subject (sample: the kit's toy subject)",
                          ("photos",), form=True),
    "UPLOAD": Param("bool", "on Colab: choose your photos in an upload dialog; saved into INSTANCE_DIR and checked",
                    ("upload",), form=True),
    "IDENTIFIER": Param("str", "the rare word that comes to mean your subject (DreamBooth, LoRA)", form=True),
    "CLASS_NOUN": Param("str", "what the subject is: dog, cat, toy, person, ...", form=True),
    "OUTPUT_DIR": Param("str", "where the notebook writes its models, pictures and logs"),
    "USE_DRIVE": Param("bool", "on Colab: photos, outputs, checkpoints (00: the model download) in Google Drive",
                       ("drive",), form=True),
    "SMOKE": Param("bool", "tiny settings, only to check that the notebook runs (CI)", ("only to check",)),
    "SEED": Param("int", "the seed of the data order, the noise and the first sample image"),
    "PRESET": Param("str", "memory preset: auto (from the GPU), 8gb, 12gb, 16gb, 24gb, 40gb or cpu", ("preset",),
                    form=True, choices=("auto", "8gb", "8gb-deepspeed", "12gb", "16gb", "24gb", "40gb", "cpu")),
    "RESUME": Param("str", "auto: continue from the latest complete checkpoint; never: start over", ("checkpoint",),
                    form=True, choices=("auto", "never"), open=True),
    "CHECKPOINTING_STEPS": Param("int", "write a resumable checkpoint every this many training steps (0: never)",
                                 STEPS_EVERY),
    "CHECKPOINTS_DIR": Param("str", "where checkpoints go (empty: OUTPUT_DIR/checkpoints)"),
    # --- training
    "MAX_TRAIN_STEPS": Param("int | list[int]", "optimizer steps of a training run (07: a list, one run per value)",
                             TRAINING_STEPS, form=True),
    "OFFLINE_MAX_TRAIN_STEPS": Param("int | list[int]", "MAX_TRAIN_STEPS on the offline model", TRAINING_STEPS),
    "LEARNING_RATE": Param("float", "learning rate of the main run on the real model (SD 1.5; 08: SDXL)", form=True),
    "OFFLINE_LEARNING_RATE": Param("float", "LEARNING_RATE on the offline model (08: the tiny SDXL)"),
    "LEARNING_RATES": Param("list[float]", "07: the LEARNING_RATE of each run of notebook 01 (SD 1.5)", form=True),
    "OFFLINE_LEARNING_RATES": Param("list[float]", "07: the OFFLINE_LEARNING_RATE of each run of notebook 01"),
    "TRAIN_BATCH_SIZE": Param("int", "instance pictures per training step on the real model", ("images per step",)),
    "OFFLINE_BATCH_SIZE": Param("int", "TRAIN_BATCH_SIZE on the offline model", ("per step",)),
    "GRADIENT_ACCUMULATION_STEPS": Param("int", "training steps whose gradients are summed into one update"),
    "RESOLUTION": Param("int", "training and sampling size in pixels on the real model (the offline one: always 64)",
                        ("trains at",)),
    "SAVE_DTYPE": Param("str", "precision of the saved weights: fp16 or fp32"),
    # --- watching a run
    "VALIDATION_STEPS": Param("int", "draw the validation prompts every this many training steps", STEPS_EVERY),
    "VALIDATION_IMAGES": Param("int", "pictures per validation prompt", ("per validation prompt",)),
    "EVAL_STEPS": Param("int", "score subject and prompt fidelity every this many training steps and keep the best "
                               "model in best/ (0: off)", STEPS_EVERY, form=True),
    "EVAL_SEEDS": Param("int", "pictures per scoring prompt at each evaluation", ("per scoring prompt",)),
    "KEEP_MODELS": Param("bool", "07, SD 1.5: keep every run's model folder (about 4 GB each)"),
    # --- sampling
    "SAMPLE_STEPS": Param("int | list[int]", "inference (denoising) steps per image (03: a list, the grid's "
                                             "columns)", ("inference",), form=True),
    "SCHEDULER": Param("str", "the sampler: ddim, pndm, lms, euler, euler_a, dpmpp_2m", form=True,
                       choices=("ddim", "pndm", "lms", "euler", "euler_a", "dpmpp_2m")),
    "SCHEDULERS": Param("list[str]", "03: the samplers compared, the grid's rows"),
    "NUM_SEEDS": Param("int", "seeds per prompt (or per grid cell) in the comparisons", ("seeds",)),
    "REFERENCE_STEPS": Param("int", "03: DDIM inference steps of the reference pictures each grid cell is measured "
                                    "against", ("steps",)),
    "GUIDANCE": Param("float", "classifier-free guidance scale", ("guidance",)),
    "PROMPT": Param("str", "what to draw (00: the playground's first prompt on SD 1.5; empty: the notebook's "
                           "choice)", form=True),
    "OFFLINE_PROMPT": Param("str", "PROMPT on the offline model"),
    "PLAYGROUND": Param("bool", "00: show the prompt playground"),
    "DOWNLOAD": Param("bool", "00: download the base model now (GPU + hub only)"),
    # --- taking it home
    "EXPORT": Param("bool", "after training: write the take-home files and check that each loads back", form=True),
    "PUSH_TO_HUB": Param("bool", "upload the take-home files to a private Hugging Face Hub repo", form=True),
    "HUB_REPO": Param("str", "the repo name on the Hub (your user name is put in front)", form=True),
    # --- 02 prior preservation
    "CLASS_PROMPT": Param("str", "the class without the identifier (empty: a photo of a CLASS_NOUN)"),
    "CONTEXT": Param("str", "words after the subject in the sample prompts (empty: the notebook's choice)"),
    "CLASS_IMAGES": Param("str", "generate (the model makes them, cached) or a folder of your own class pictures"),
    "NUM_CLASS_IMAGES": Param("int", "class images used for prior preservation"),
    "CLASS_BATCH_SIZE": Param("int", "class images generated at once"),
    "CLASS_CACHE_DIR": Param("str", "where generated class images are kept (empty: the kit cache)"),
    "DRIVE_DIR": Param("str", "on Colab: a Google Drive subfolder for the class images (empty: off)"),
    "PRIOR_TRAIN_TEXT_ENCODER": Param("bool", "02: a third run, prior preservation with the text encoder trained too"),
    "PRIOR_LOSS_WEIGHT": Param("float", "weight of the class (prior) term of the loss"),
    # --- 03 schedulers (SCHEDULERS, SAMPLE_STEPS as a list, NUM_SEEDS, GUIDANCE above)
    # --- 04 text encoder
    "TEXT_ENCODER_STEPS": Param("int | None", "train the text encoder for the first this many training steps "
                                              "(None: all the way)", ("steps",)),
    "COMPLEX_PROMPT": Param("str", "a prompt asking for several things at once (empty: one that suits the model)"),
    # --- 05 textual inversion
    "PLACEHOLDER": Param("str", "the new word textual inversion learns, e.g. <zwx>", form=True),
    "INITIALIZER": Param("str", "one existing word close to the subject: where the new word starts", form=True),
    "NUM_VECTORS": Param("int", "embedding vectors behind the new word"),
    "TI_STEPS": Param("int", "optimizer steps of the textual-inversion run", ("steps",), form=True),
    "OFFLINE_TI_STEPS": Param("int", "TI_STEPS on the offline model", ("steps",)),
    "TI_LEARNING_RATE": Param("float", "learning rate of the textual-inversion run on SD 1.5", form=True),
    "OFFLINE_TI_LEARNING_RATE": Param("float", "TI_LEARNING_RATE on the offline model"),
    "COMPARE_DREAMBOOTH": Param("bool", "also train the comparison DreamBooth runs (05: three, 06: one)",
                                ("dreambooth",), form=True),
    "DB_STEPS": Param("int", "05: optimizer steps of each comparison DreamBooth run", ("steps",)),
    "OFFLINE_DB_STEPS": Param("int", "DB_STEPS on the offline model", ("steps",)),
    "DB_LEARNING_RATE": Param("float", "learning rate of the plain comparison DreamBooth runs on SD 1.5"),
    "OFFLINE_DB_LEARNING_RATE": Param("float", "DB_LEARNING_RATE on the offline model"),
    "DB_AFTER_TI_LEARNING_RATE": Param("float", "05: learning rate of DreamBooth started from the learned word"),
    "OFFLINE_DB_AFTER_TI_LEARNING_RATE": Param("float", "DB_AFTER_TI_LEARNING_RATE on the offline model"),
    # --- 06 LoRA
    "LORA_RANK": Param("int", "rank of the LoRA adapters", form=True),
    "LORA_ALPHA": Param("int", "LoRA alpha: updates are scaled by alpha / rank"),
    "LORA_TEXT_ENCODER": Param("bool", "also put LoRA adapters on the text encoder"),
    "SCALES": Param("list[float]", "06: LoRA strengths compared at inference (0: the base model)"),
}

# Every notebook that trains has these (tests/test_parameter_names.py).
TRAINING_NOTEBOOKS = ("01_dreambooth", "02_prior_preservation", "03_schedulers", "04_text_encoder",
                      "05_textual_inversion", "06_lora", "07_finding_the_sweet_spot", "08_sdxl_lora")
TRAINING_REQUIRED = ("PRESET", "EVAL_STEPS", "RESUME")

_KINDS = {"int": int, "float": (int, float), "str": str, "bool": bool}


def matches(kind: str, value) -> bool:
    """Whether a literal `value` has the table's `kind` (an int is a float; a bool is never an int)."""
    for k in (k.strip() for k in kind.split("|")):
        if k == "None" and value is None:
            return True
        if k.startswith("list[") and isinstance(value, list):
            inner = k[5:-1]
            if all(matches(inner, v) for v in value):
                return True
        elif k in _KINDS and isinstance(value, _KINDS[k]) and (k == "bool" or not isinstance(value, bool)):
            return True
    return False


def problems(name: str, value, comment: str) -> list[str]:
    """What is wrong with one parameter line against the table (empty: nothing)."""
    p = PARAMETERS.get(name)
    if p is None:
        return [f"{name}: not in nbkit/notebook/parameters.py PARAMETERS; add it there with its one meaning"]
    out = []
    if not matches(p.kind, value):
        out.append(f"{name} = {value!r}: the table says {p.kind} ({p.meaning})")
    if p.says and not any(w in comment.lower() for w in p.says):
        out.append(f"{name}: its comment {comment!r} should say {' or '.join(map(repr, p.says))} ({p.meaning})")
    return out


_FORM_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))


def colab_marker(name: str, value) -> str:
    """Colab's form marker for a student-facing parameter: `#@param {type:"integer"}`, `#@param ["a", "b"]`, ...
    (a list or None is a raw Python field); "" for the others."""
    p = PARAMETERS.get(name)
    if p is None or not p.form:
        return ""
    if p.choices:
        options = "[" + ", ".join(f'"{c}"' for c in p.choices) + "]"
        return f"#@param {options}" + (" {allow-input: true}" if p.open else "")
    kind = next((k for t, k in _FORM_TYPES if isinstance(value, t)), "raw")
    return f'#@param {{type:"{kind}"}}'


# Colab's form marker before the explanation: `#@param {type:"integer"}  # ...`, `#@param ["a", "b"] {...}  # ...`
_COLAB_PARAM = re.compile(r"^#\s*@param\s*(\[[^\]]*\])?\s*(\{[^}]*\})?\s*")


def explanation(comment: str) -> str:
    """The explanatory text of a parameter line's comment, without Colab's `#@param ...` form marker."""
    text = _COLAB_PARAM.sub("", comment.strip())
    return text.lstrip("#").strip()


def markdown() -> str:
    """The table as markdown (docs/parameters.md)."""
    rows = ["| name | kind | meaning |", "|---|---|---|"]
    rows += [f"| `{n}` | {p.kind} | {p.meaning} |" for n, p in PARAMETERS.items()]
    return "\n".join(rows)


if __name__ == "__main__":  # python -m nbkit.notebook.parameters: rewrite docs/parameters.md
    from nbkit.paths import ROOT

    doc = ROOT / "docs" / "parameters.md"
    doc.write_text("# Notebook parameters: one name, one meaning\n\nEvery notebook's `parameters` cell uses only "
                   "these names, each with this kind and meaning (the table lives in "
                   "`nbkit/notebook/parameters.py`; `tests/test_parameter_names.py` checks every notebook "
                   "against it; this page is made by `python -m nbkit.notebook.parameters`).\n\n"
                   + markdown() + "\n")
    print(f"wrote {doc}")
