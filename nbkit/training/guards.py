"""What stops a run early, clearly: an unwritable folder, too little disk, out of GPU memory, a non-finite loss.

Each check turns a failure that would otherwise come as a stack trace (or twenty minutes later) into one
message that says what is wrong and which setting to change. Disk and folders are checked before anything
is loaded; out-of-memory errors free the GPU memory of the failed step, so the notebook can go on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nbkit.config import TrainConfig
from nbkit.env import runtime
from nbkit.errors import GENERATION_ADVICE, DiskSpaceError, NotWritable, OutOfMemory, is_oom, out_of_memory, release  # noqa: F401
from nbkit.training.savers import remedies
from nbkit.units import format_bytes


def writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and check a file can be written there; raise NotWritable otherwise."""
    path = Path(path)
    probe = path / f".nbkit-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise NotWritable(
            f"{what} {str(path)!r} is not writable ({err.strerror or err}). Choose a folder you can write to, e.g. "
            "'outputs/run' next to the notebook (on Colab '/content/outputs', or a folder in /content/drive/MyDrive "
            "after mounting Google Drive)."
        ) from err
    return path


def writable_folders(cfg: TrainConfig, checkpoints_dir: Path) -> Path:
    """Check every folder the run writes to (output, checkpoints if any will be written, class images); return
    the output folder."""
    out = writable_dir(cfg.output_dir, "output_dir")
    if cfg.checkpointing_steps and cfg.max_train_steps >= cfg.checkpointing_steps:
        writable_dir(checkpoints_dir, "checkpoints_dir")
    for c in cfg.concepts() if cfg.with_prior_preservation else ():  # each subject's own class folder
        writable_dir(c.class_dir, "class_dir")
    return out


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def gb(n: float) -> str:
    """Bytes for the disk-space messages (2 decimals: 'needed' and 'free' must differ where they do)."""
    return format_bytes(n, 2)


def check_disk(needs: list[tuple[Path, int, str]], margin: int = 100 << 20) -> None:
    """needs: (folder, bytes, what). Raise DiskSpaceError for a disk whose free space is below its sum + margin."""
    by_disk: dict[int, tuple[Path, list[tuple[int, str]]]] = {}
    for where, nbytes, what in needs:
        if nbytes <= 0:
            continue
        root = _existing(where)
        by_disk.setdefault(os.stat(root).st_dev, (root, []))[1].append((nbytes, what))
    problems = []
    for root, items in by_disk.values():
        free = shutil.disk_usage(root).free
        total = sum(n for n, _ in items)
        if total + margin > free:
            lines = "\n".join(f"    {gb(n):>9}  {what}" for n, what in items)
            problems.append(f"{root}: about {gb(total)} needed, {gb(free)} free:\n{lines}")
    if problems:
        raise DiskSpaceError(
            "Not enough disk space for this run (checked before starting):\n  " + "\n  ".join(problems) +
            "\nFree some space, or: put checkpoints on a bigger disk with checkpoints_dir (on Colab a Google Drive "
            "folder), keep fewer with checkpoints_total_limit=1, make them 3x smaller with use_8bit_adam=True (GPU), "
            "write them less often or never (checkpointing_steps), save the model with save_dtype='fp16', or use "
            "fewer class images (num_class_images)."
        )


def run_disk_needs(cfg: TrainConfig, parts, method, existing_checkpoints: int, start_step: int,
                   eight_bit_adam: bool) -> list[tuple[Path, int, str]]:
    """What this run will write, per folder: class images, checkpoints (with the one being written), the model
    (and the best model so far, when the run keeps it)."""
    from nbkit.data import images as data
    from nbkit.training import checkpoint

    needs = []
    for folder in sorted({c.class_dir for c in cfg.concepts()}) if cfg.with_prior_preservation else ():
        have = len(data.scan(folder, "class")[0]) if Path(folder).is_dir() else 0
        missing = max(0, cfg.num_class_images - have)
        needs.append((Path(folder), missing * cfg.resolution ** 2 * 3, f"{missing} class images (PNG)"))
    every, limit = cfg.checkpointing_steps, cfg.checkpoints_total_limit
    new = (cfg.max_train_steps // every - start_step // every) if every else 0
    if new > 0:
        size = checkpoint.estimate_bytes(method.params, eight_bit_adam, cfg.use_ema)
        count = new if limit is None else min(new, max(1, limit + 1 - existing_checkpoints))
        needs.append((checkpoint.folder(cfg), count * size,
                      f"{count} checkpoint(s) of {gb(size)} (limit {limit}, plus the one being written)"))
    per = 2 if cfg.save_dtype == "fp16" else 4
    if method.name == "dreambooth":
        n = sum(p.numel() for m in parts.networks.values() for p in m.parameters())
    else:
        n = sum(p.numel() for p in method.params) if method.name == "lora" else 1 << 16
    needs.append((Path(cfg.output_dir), n * per, f"the trained {method.name} result"))
    if cfg.eval_steps and cfg.keep_best:  # best/ holds DreamBooth's trained weights in full precision
        needs.append((Path(cfg.output_dir), n * (4 if method.name == "dreambooth" else per), "the best model (best/)"))
    return needs


# --- out of memory ----------------------------------------------------------------------------------------------

def training_advice(cfg: TrainConfig, rt: runtime.Runtime | None = None) -> list[str]:
    """The settings that lower training memory, starting with those this run does not use yet (the same for any
    runtime `rt`: the preset named is the T4's, runtime.GPUS["T4"])."""
    tips = [str(change) for change in remedies(cfg)]  # the one list of memory savers (nbkit.training.savers)
    if cfg.with_prior_preservation:
        tips.append("with_prior_preservation doubles the batch: lower train_batch_size first")
    from nbkit.training.presets import memory_settings

    preset = memory_settings(runtime.GPUS["T4"], cfg.train_text_encoder)
    tips.append("the 16 GB preset for a T4/P100: " + ", ".join(f"{k}={v!r}" for k, v in preset.items())
                + " (nbkit.training.presets.memory_settings)")
    if cfg.validation_prompts:
        tips.append("fewer validation images (num_validation_images) if it happened while sampling")
    return tips


def non_finite_loss(value: float, step: int, last_checkpoint: Path | None, precision: str,
                    model_causes: list[str] | None = None) -> FloatingPointError:
    """The error for a loss that became NaN/inf at `step` (0-based): likely causes (the model's own first, e.g.
    SDXL's fp16 VAE: parts.nan_causes) and what was kept."""
    causes = list(model_causes or [])
    if precision == "fp16":
        causes.append("fp16 overflow (try mixed_precision='bf16' where the GPU has it, or 'no')")
    causes.append("a learning rate too high (DreamBooth: 1e-6 to 2e-6 on SD 1.5; LoRA ~1e-4; TI ~5e-4)")
    if precision != "fp16":
        causes.append("fp16 overflow if the weights were loaded in fp16 (train in fp32 weights; mixed_precision "
                      "'bf16' or 'no')")
    causes.append("a broken picture (all one colour, or NaN pixels)")
    kept = (f"The last good checkpoint is kept: {last_checkpoint}. Re-running with the same output folder continues "
            "from it (a changed mixed_precision is allowed); for a lower learning rate start over (resume=None or a "
            "new output_dir)." if last_checkpoint else
            "No checkpoint had been written yet (checkpointing_steps).")
    return FloatingPointError(f"The loss became {value} at step {step + 1}; the run stopped before applying it. "
                              f"Likely causes: {'; '.join(causes)}. Nothing was saved as final. {kept}")


def non_finite_latents(parts, vae_dtype: str) -> FloatingPointError:
    """The error for training pictures whose latents came out NaN/inf (before any step): the model's causes first."""
    causes = [*parts.nan_causes(vae_dtype), f"the VAE ran in {vae_dtype} and overflowed" if vae_dtype != "float32"
              else "NaN pixels in a picture", "a broken VAE (vae=...)"]
    return FloatingPointError("The VAE encoded the training pictures to non-finite latents; nothing was trained. "
                              f"Likely causes: {'; '.join(causes)}.")
