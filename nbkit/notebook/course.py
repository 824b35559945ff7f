"""The course path: the notebooks in order, what each teaches, and the GPU memory each needs.

Memory figures are approximate peaks for Stable Diffusion 1.5 at 512 px (notebook 08: SDXL base 1.0 at 1024 px, as
planned by nbkit.memory.planner, not yet measured), batch 1, with the settings the notebooks pick for a 16 GB GPU
(fp16 mixed precision, 8-bit AdamW, cached latents; gradient checkpointing where needed). On a CPU every notebook
runs on the offline models instead (notebook 08 on the tiny SDXL), in about 2 GB of RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nbkit.paths import NOTEBOOKS_DIR

NOTEBOOKS = NOTEBOOKS_DIR


@dataclass(frozen=True)
class Notebook:
    name: str  # file stem, e.g. "01_dreambooth"
    teaches: str
    gpu_gb: float  # approximate peak GPU memory, SD 1.5 at 512 px (unless memory_note names another model)
    memory_note: str = ""


COURSE = [
    Notebook("00_start_here", "the runtime, the course path, the base model downloaded once, a prompt playground", 3.5,
             "inference only"),
    Notebook("01_dreambooth",
             "DreamBooth: an identifier for your subject, learning rate x steps, how overfitting looks",
             10, "UNet trains"),
    Notebook("02_prior_preservation", "language drift and its fix: class images made by the model itself", 12,
             "instance + class image per step; run 3 trains the text encoder too"),
    Notebook("03_schedulers", "nine samplers on one fine-tuned model, their noise measured: DDIM at ~100 steps tested",
             10, "fine-tunes once, then only samples"),
    Notebook("04_text_encoder", "fine-tuning the text encoder too, and how it fits in 16 GB", 12,
             "UNet + text encoder train: all memory savers on"),
    Notebook("05_textual_inversion", "a new word's embedding only; A1111 embeddings; textual inversion then DreamBooth",
             5, "DreamBooth part: ~10 GB"),
    Notebook("06_lora", "LoRA adapters: rank, alpha, scale, tiny files, kohya/webui keys", 5),
    Notebook("07_finding_the_sweet_spot", "a learning-rate x steps sweep of notebook 01: measure every run, find the "
             "sweet spot", 10, "one DreamBooth run at a time"),
    Notebook("08_sdxl_lora", "LoRA on SDXL: two text encoders, size conditioning, the fp32 VAE, what it costs; "
             "diffusers and kohya (lora_te1_/lora_te2_) files", 13, "SDXL at 1024 px, planned"),
]


def available(notebooks_dir: Path = NOTEBOOKS) -> list[Notebook]:
    """The course's notebooks present in `notebooks_dir`."""
    return [nb for nb in COURSE if (Path(notebooks_dir) / f"{nb.name}.ipynb").exists()]


def table(gpu_memory_gb: float | None = None, notebooks_dir: Path = NOTEBOOKS) -> str:
    """The course path as a markdown table; with the GPU's memory, whether each notebook fits it."""
    head = "| notebook | what you learn | GPU memory (SD 1.5, 512 px, unless noted) |"
    rule = "|---|---|---|"
    if gpu_memory_gb is not None:
        head, rule = head + " on this GPU |", rule + "---|"
    rows = [head, rule]
    for nb in COURSE:
        here = (Path(notebooks_dir) / f"{nb.name}.ipynb").exists()
        name = f"`{nb.name}`" if here else f"{nb.name} *(coming)*"
        mem = f"~{nb.gpu_gb:g} GB" + (f" ({nb.memory_note})" if nb.memory_note else "")
        row = f"| {name} | {nb.teaches} | {mem} |"
        if gpu_memory_gb is not None:
            if gpu_memory_gb <= 0:
                row += " offline model on CPU |"
            else:
                row += " fits |" if nb.gpu_gb <= gpu_memory_gb - 1 else " too big: use LoRA/TI or a bigger GPU |"
        rows.append(row)
    return "\n".join(rows)


def plot_memory(gpu_memory_gb: float | None = None, ax=None):
    """Bar chart of each notebook's GPU memory, with a line at this GPU's memory (or at 16 GB, the design point)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 2.8))[1]
    names = [nb.name for nb in COURSE]
    limit = gpu_memory_gb if gpu_memory_gb else 16.0
    colours = ["tab:green" if nb.gpu_gb <= limit - 1 else "tab:red" for nb in COURSE]
    ax.barh(names[::-1], [nb.gpu_gb for nb in COURSE][::-1], color=colours[::-1])
    label = f"this GPU: {gpu_memory_gb:.0f} GB" if gpu_memory_gb else "a 16 GB Colab/Kaggle GPU (T4, P100)"
    ax.axvline(limit, color="k", ls="--", lw=1, label=label)
    ax.set_xlabel("approx. peak GPU memory, SD 1.5 at 512 px; 08: SDXL at 1024 px, planned (GB)")
    ax.legend(loc="lower right", fontsize=8)
    ax.figure.tight_layout()
    return ax
