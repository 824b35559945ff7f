"""Colab, Kaggle and workshop machines: a readable runtime check, Google Drive, and where files go.

On Colab a disconnect wipes the machine: with `mount_drive()` the photos are read from, and outputs, checkpoints
and the model download cache written to, your Google Drive, so a new session picks up where the last one stopped.
Nothing here blocks or asks anything on a headless (papermill) run: Drive is only ever mounted on Colab, when asked.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from nbkit.env import runtime

DRIVE_MOUNTPOINT = "/content/drive"
PROJECT = "nbkit"  # the folder in My Drive (or on Kaggle, in /kaggle/working) that holds the course's files


@dataclass(frozen=True)
class Paths:
    """Where the course keeps its files on this machine (in Drive when mounted)."""

    root: Path  # everything below lives here
    instance_dir: Path  # your photos, one sub-folder per subject
    class_dir: Path  # class images for prior preservation, made once and shared by every notebook and run
    outputs: Path  # one sub-folder per notebook: models, samples, logs, checkpoints
    exports: Path  # files to take home: single-file checkpoints, LoRA and embedding files
    on_drive: bool  # True when root is in Google Drive (survives a disconnect)

    def output(self, notebook: str) -> Path:
        """The output folder of one notebook, e.g. paths.output('01_dreambooth')."""
        return self.outputs / notebook

    def create(self) -> Paths:
        """Make the folders (e.g. in Drive, so you can drop photos into `instance`); returns self."""
        for folder in (self.instance_dir, self.class_dir, self.outputs, self.exports):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def describe(self) -> str:
        where = "Google Drive (kept after a disconnect)" if self.on_drive else "this machine's disk"
        return "\n".join([f"Files go to {where}:", f"  photos        {self.instance_dir}",
                          f"  class images  {self.class_dir}", f"  outputs       {self.outputs}",
                          f"  exports       {self.exports}"])


def mount_drive(use: bool = True, mountpoint: str | Path = DRIVE_MOUNTPOINT) -> Path | None:
    """Mount Google Drive on Colab when `use`; returns its 'My Drive' folder, or None (not Colab, or not asked).

    Colab shows a permission pop-up the first time; elsewhere nothing happens (a message says so).
    """
    if not use:
        return None
    if runtime.platform() != "colab":
        print("Google Drive is only mounted on Colab: here files stay in local folders.")
        return None
    my_drive = Path(mountpoint) / "MyDrive"
    if not my_drive.is_dir():
        from google.colab import drive  # only on Colab

        drive.mount(str(mountpoint))
    return my_drive


def paths(drive: Path | None = None, root: str | Path | None = None, project: str = PROJECT) -> Paths:
    """The course's folders: in Drive when `drive` is given (see mount_drive), on Kaggle in /kaggle/working
    (kept with the notebook's output), otherwise under `root` (default: the current folder)."""
    if drive is not None:
        base, on_drive = Path(drive) / project, True
    elif root is not None:
        base, on_drive = Path(root), False
    elif runtime.platform() == "kaggle":
        base, on_drive = Path("/kaggle/working") / project, False
    else:
        base, on_drive = Path("."), False
    return Paths(base, base / "instance", base / "class_images", base / "outputs", base / "exports", on_drive)


@dataclass(frozen=True)
class NotebookFiles:
    """Where one notebook reads and writes (the Drive folders when Drive is on): see `notebook_files`."""

    root: Path  # the course folder (in Drive: MyDrive/nbkit; else the current folder)
    output_dir: Path  # the notebook's outputs: models, samples, logs and checkpoints (so RESUME=auto finds them)
    instance_dir: Path  # the photos of the subject
    exports: Path  # the files to take home
    class_dir: Path | None  # shared class images (Drive only; None: the notebook's own default)
    on_drive: bool

    def path(self, p: str | Path) -> Path:
        """A path the user gave (e.g. FINETUNED_MODEL): a relative one that exists in the course folder in Drive is
        taken from there; anything else (an absolute path, a hub id) is returned as given."""
        p = Path(p)
        return self.root / p if self.on_drive and not p.is_absolute() and (self.root / p).exists() else p


def notebook_files(notebook: str, use_drive: bool, output_dir: str | Path, instance_dir: str | Path = "sample",
                   mountpoint: str | Path = DRIVE_MOUNTPOINT) -> NotebookFiles:
    """The folders of one notebook. With `use_drive` on Colab, Drive is mounted and relative paths go into the
    course folder in it: OUTPUT_DIR `outputs/01_dreambooth` becomes `MyDrive/nbkit/outputs/01_dreambooth`, a
    photo folder `my_dog` becomes `MyDrive/nbkit/instance/my_dog` (unless only a local `my_dog` exists), exports
    go to `MyDrive/nbkit/exports/<notebook>` and the model download cache into Drive too; a disconnect then loses
    nothing (checkpoints included, so the training cell resumes). Anywhere else: the folders as given, and one
    printed line.
    `instance_dir="sample"` is the toy subject shipped with the kit.
    """
    from nbkit.paths import SAMPLE_INSTANCE_DIR

    sample = str(instance_dir) == "sample"
    drive = mount_drive(use_drive, mountpoint)
    if drive is None:
        out = Path(output_dir)
        if not use_drive:
            print(f"Files stay on this machine, in {out}" + (" (USE_DRIVE = True keeps them in Google Drive)."
                                                              if runtime.platform() == "colab" else "."))
        return NotebookFiles(Path("."), out, Path(SAMPLE_INSTANCE_DIR if sample else instance_dir), out / "export",
                             None, False)
    p = paths(drive).create()
    hub_cache_on_drive(drive)
    out = Path(output_dir)
    out = out if out.is_absolute() else p.root / out
    inst = Path(SAMPLE_INSTANCE_DIR if sample else instance_dir)
    if not inst.is_absolute():  # photos in Drive's instance/ folder (unless only a local folder of that name exists)
        in_drive = p.instance_dir / (inst.relative_to("instance") if inst.parts[:1] == ("instance",) else inst)
        inst = in_drive if in_drive.exists() or not inst.exists() else inst
    files = NotebookFiles(p.root, out, inst, p.exports / notebook, p.class_dir, True)
    print(f"Google Drive: outputs and checkpoints in {out}, photos in {inst}, exports in {files.exports}.")
    return files


def hub_cache_on_drive(drive: Path, project: str = PROJECT) -> Path:
    """Keep the Hugging Face download cache in Drive, so the base model is downloaded once, not every session.

    The local cache folder becomes a link into Drive (works whatever was imported before). A local cache that
    already holds downloads is left alone (said so). Returns the folder the cache now lives in.
    """
    from huggingface_hub import constants

    local, target = Path(constants.HF_HUB_CACHE), Path(drive) / project / "hf-cache"
    target.mkdir(parents=True, exist_ok=True)
    if local.is_symlink():
        if local.resolve() == target.resolve():
            return target
        local.unlink()
    elif local.is_dir():
        if any(local.iterdir()):
            print(f"{local} already holds downloads: keeping the cache there (not in Drive).")
            return local
        local.rmdir()
    local.parent.mkdir(parents=True, exist_ok=True)
    local.symlink_to(target, target_is_directory=True)
    return target


def drive_space(needed: int, folder: str | Path | None = None) -> str:
    """The Google Drive check a notebook prints before it writes there: the bytes it will need (outputs,
    checkpoints, exports, the model cache) against the free space of `folder` (default: My Drive when mounted)."""
    line = f"Google Drive: this notebook writes about {needed / 1e9:.1f} GB there (outputs, checkpoints, models)"
    if folder is None and (Path(DRIVE_MOUNTPOINT) / "MyDrive").is_dir():
        folder = Path(DRIVE_MOUNTPOINT) / "MyDrive"
    if folder is None or not Path(folder).exists():
        return line + "; its free space is shown once Drive is mounted."
    free = shutil.disk_usage(folder).free
    if free < needed:
        return (line + f", but only {free / 1e9:.1f} GB is free -> make room in Drive (a free account has 15 GB), "
                "or set EVAL_STEPS = 0 (no best/), EXPORT = False, or USE_DRIVE = False.")
    return line + f"; {free / 1e9:.1f} GB is free."


def _host_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not on this OS
        return 0.0


def check_runtime(rt: runtime.Runtime | None = None, hub: bool | None = None, preset: str | None = None) -> str:
    """A readable summary of this runtime: where, which GPU and how much memory, the memory preset the notebooks
    will use (`preset`, in words: nbkit.training.presets.describe_settings), host RAM and disk, whether the model hub
    answers; and what to do when something is missing."""
    rt = rt or runtime.detect()
    hub = runtime.hub_reachable() if hub is None else hub
    where = {"colab": "Google Colab", "kaggle": "Kaggle", "local": "this machine"}[rt.platform]
    if rt.device == "cuda":
        gpu = (f"{rt.gpu_count}x {rt.gpu_name}" if rt.gpu_count > 1 else rt.gpu_name) + \
              f", {rt.gpu_memory_gb:.1f} GB, {'bf16 and fp16' if rt.bf16 else 'fp16 only (no bf16)'}"
    else:
        gpu = f"none ({rt.device})"
    disk = shutil.disk_usage(".").free / 2**30
    lines = [f"Runtime:       {where}", f"GPU:           {gpu}"] + ([f"Preset:        {preset}"] if preset else []) + [
             f"Host RAM:      {_host_ram_gb():.1f} GB · free disk here: {disk:.0f} GB",
             f"Model hub:     {'reachable' if hub else 'not reachable: the notebooks use the offline model'}"]
    if rt.device != "cuda" and rt.platform == "colab":
        lines.append("-> No GPU. Runtime > Change runtime type > T4 GPU, then run the notebook again from the top.")
    elif rt.device != "cuda" and rt.platform == "kaggle":
        lines.append("-> No GPU. Settings > Accelerator > GPU T4 x2 (or P100), then run again from the top.")
    elif rt.device != "cuda":
        lines.append("-> No GPU: every notebook still runs, on the small offline model (a few minutes each on a CPU).")
    elif rt.gpu_memory_gb < 15:
        lines.append(f"-> {rt.gpu_memory_gb:.0f} GB is less than the 16 GB the course is tuned for: LoRA and textual "
                     "inversion fit; full DreamBooth needs the memory-saving settings shown (or a bigger GPU).")
    if disk < 10 and rt.device == "cuda":
        lines.append(f"-> Only {disk:.0f} GB of free disk: Stable Diffusion 1.5 needs ~5 GB, each saved model ~2-4 GB.")
    return "\n".join(lines)


def _interactive_colab() -> bool:
    """True inside a notebook open in Colab's own front end (where a Drive mount can ask for consent)."""
    if "google.colab" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and type(shell).__module__.startswith("google.colab")


def drive_folder(subfolder: str, timeout_s: int = 120) -> tuple[Path | None, str]:
    """`subfolder` inside Google Drive ("MyDrive/<subfolder>"), or None and why not.

    Drive is mounted only in an interactive Colab notebook (it asks for consent there); a headless run
    (papermill, Kaggle, local) never waits for a mount: it uses Drive only if it is already mounted.
    """
    root = Path(DRIVE_MOUNTPOINT)
    target = root / "MyDrive" / subfolder.strip("/")
    if (root / "MyDrive").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return target, f"Google Drive folder {target}"
    if not _interactive_colab():
        return None, ("Google Drive is not mounted and this is not an interactive Colab notebook, so it is not "
                      "mounted now (that would wait for a consent click): using the local cache instead.")
    try:
        from google.colab import drive

        drive.mount(str(root), timeout_ms=timeout_s * 1000)
    except Exception as err:  # noqa: BLE001 - consent refused, timeout, or no Drive: fall back, say why
        return None, f"Google Drive could not be mounted ({err}): using the local cache instead."
    target.mkdir(parents=True, exist_ok=True)
    return target, f"Google Drive folder {target} (mounted now)"
