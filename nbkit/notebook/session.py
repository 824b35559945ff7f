"""The first code cell of every notebook, in one call: `s = nb.setup("01_dreambooth", model=MODEL, ...)`.

What it decides, in order (and prints, once):

1. the runtime: platform, GPU and its memory, the memory preset (`colab.check_runtime`);
2. the model: `MODEL = "auto"` is SD 1.5 on a GPU with the hub, the small offline model otherwise, and why; in
   an SDXL notebook (`family="sdxl"`) SDXL base 1.0 on a GPU with the hub, the tiny SDXL otherwise
   (nbkit.env.runtime.choose_model);
3. `small`: is that one of the kit's offline models (the toy model or the tiny SDXL, asked for by name, or its
   folder)? Their numbers differ from SD's: 64 px, higher learning rates, `s.pick(offline_value, sd_value)` chooses;
4. the folders: photos, outputs, exports, in Google Drive with `use_drive` on Colab (`colab.notebook_files`);
   the output folder is made; a checkpoints folder in Drive mounts Drive;
5. the subject, when the notebook names one (`class_noun`, its CLASS_NOUN): `INSTANCE_DIR = "sample"` is the toy
   star on the offline model and the diffusers docs' dog photos on SD 1.5 (downloaded once), and `"auto"` its class
   noun ("star", "dog"); your own folder needs CLASS_NOUN (nbkit.data.subject decides, one printed line says what);
6. smoke mode (CI): `s.smoke(smoke_value, real_value)` chooses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from nbkit.data import subject as subjects
from nbkit.env import colab, runtime
from nbkit.models import offline, sdxl
from nbkit.training import presets

# Scenes for a subject on SD 1.5: ones its pictures never show, so what is learned is the subject, not a scene.
SD_SCENES = ("a photo of {s} on the beach", "a photo of {s} in the snow", "a photo of {s} in a forest",
             "an oil painting of {s} in the style of van gogh")
# The offline world: shapes on plain backgrounds. Only those the sample pictures never show are new contexts (the
# toy judge, docs/findings.md and the notebooks all call these two "new"; black, white and yellow are in the pictures).
OFFLINE_BACKGROUNDS = offline.NEW_CONTEXTS


def is_offline_model(model: str | Path) -> bool:
    """True for the kit's small offline models: the toy model ("offline" or its folder) and the tiny SDXL
    ("tiny-sdxl" or its folder)."""
    if str(model) in ("offline", runtime.TINY_SDXL):
        return True
    where = Path(str(model)).resolve()
    return where in (offline.offline_model_dir().resolve(), sdxl.TINY_SDXL.resolve())


@dataclass(frozen=True)
class Setup:
    """What a notebook runs on, decided once by `setup()`."""

    notebook: str  # e.g. "01_dreambooth"
    rt: runtime.Runtime  # where we run: platform, device, GPU
    model: str  # the model to load: a hub id, a folder, or "offline"
    why: str  # why that model (one sentence, printed)
    report: str  # the runtime check, as printed
    small: bool  # the small offline model (64 px, toy shapes): pick() chooses its values
    files: colab.NotebookFiles  # where the notebook reads and writes (Drive when asked)
    instance_dir: Path  # the photos of the subject
    out: Path  # the notebook's output folder (made)
    resolution: int  # training and sampling size: the offline model's 64, else as asked
    is_smoke: bool  # smoke mode: tiny settings, only to check the notebook runs
    class_noun: str = ""  # what the subject is ("star", "dog", CLASS_NOUN); "" when the notebook names no subject
    subject_why: str = ""  # which subject the notebook got and why (printed)
    family: str = "sd"  # the models the notebook is for: "sd" (SD 1.5 / the toy model) or "sdxl" (SDXL / tiny SDXL)

    def noun(self, value: str) -> str:
        """`value`, or the subject's class noun when it is "auto": `INITIALIZER = setup.noun(INITIALIZER)`."""
        return self.class_noun if subjects.is_auto(value) else value

    def pick(self, offline_value, sd_value):
        """`offline_value` on the small offline model, else `sd_value`:
        `s.pick(OFFLINE_LEARNING_RATE, LEARNING_RATE)`."""
        return offline_value if self.small else sd_value

    def smoke(self, smoke_value, real_value):
        """`smoke_value` in smoke mode, else `real_value`: `s.smoke(4, MAX_TRAIN_STEPS)`."""
        return smoke_value if self.is_smoke else real_value

    @property
    def device(self) -> str:
        """Where a freshly loaded pipeline goes: "cuda" on a GPU, else "cpu"."""
        return "cuda" if self.rt.device == "cuda" else "cpu"

    @property
    def sample_dtype(self):
        """fp16 for sampling on a GPU (half the memory and time), None (fp32) elsewhere."""
        import torch

        return torch.float16 if self.rt.device == "cuda" else None

    def contexts(self, subject: str, backgrounds: tuple[str, ...] = OFFLINE_BACKGROUNDS) -> list[str]:
        """Prompts with `subject` in new scenes: the plain backgrounds its pictures never show on the offline model
        (two), places on SD 1.5 (four)."""
        if self.small:
            return [f"a photo of a {subject} on a {bg} background" for bg in backgrounds]
        return [scene.format(s=subject) for scene in SD_SCENES]


def setup(notebook: str, *, model: str = "auto", instance_dir: str | Path = "sample", class_noun: str | None = None,
          output_dir: str | Path | None = None, use_drive: bool = False, smoke: bool = False, resolution: int = 512,
          checkpoints_dir: str | Path = "", family: str = "sd") -> Setup:
    """Decide what `notebook` runs on and where its files go; print the runtime check and the model's reason.

    model, instance_dir, class_noun, output_dir (default outputs/<notebook>), use_drive, smoke, resolution,
    checkpoints_dir: the notebook's MODEL, INSTANCE_DIR, CLASS_NOUN, OUTPUT_DIR, USE_DRIVE, SMOKE, RESOLUTION and
    CHECKPOINTS_DIR parameters. `family`: "sd" (SD 1.5, the toy model offline) or "sdxl" (SDXL base 1.0, the tiny
    SDXL offline at 64 px: SEEDED RANDOM weights, said when chosen). `class_noun=None` (a notebook that trains no
    subject): nothing is downloaded and "sample" stays the toy star's folder. Raises ConfigError (an own folder with
    CLASS_NOUN "auto") or DataError (a real model and the sample photos cannot be downloaded), each saying what to do.
    """
    rt = runtime.detect()
    chosen, why = runtime.choose_model(model, rt, family)
    report = colab.check_runtime(rt, preset=presets.describe_settings(presets.memory_settings(rt), rt))
    print(report)  # the GPU, its memory and the memory preset the runs use
    print(why)
    files = colab.notebook_files(notebook, use_drive, output_dir or f"outputs/{notebook}", instance_dir)
    files.output_dir.mkdir(parents=True, exist_ok=True)
    if str(checkpoints_dir).startswith(colab.DRIVE_MOUNTPOINT) and rt.platform == "colab":
        colab.mount_drive(True)  # checkpoints in Drive outlive the runtime
    small = is_offline_model(chosen)
    noun = subject_why = ""
    if class_noun is not None:
        subj = subjects.choose(subjects.SAMPLE if str(instance_dir) == subjects.SAMPLE else files.instance_dir,
                               class_noun, small, chosen)
        print(subj.why)
        files, noun, subject_why = replace(files, instance_dir=subj.instance_dir), subj.class_noun, subj.why
    px = (sdxl.TINY_SDXL_RESOLUTION if family == "sdxl" else offline.OFFLINE_RESOLUTION) if small else resolution
    return Setup(notebook, rt, chosen, why, report, small, files, files.instance_dir, files.output_dir, px, smoke, noun,
                 subject_why, family)
