"""Class images for prior preservation: made by the model itself, cached on disk, reused on the next run;
or the user's own pictures of the class; on Colab, optionally kept in Google Drive across sessions.

Only the missing images are generated, each from its own seed, each written atomically (temp + rename), so an
interrupted generation resumes where it stopped and a half-written PNG is never trained on. A hidden
`.nbkit_class.json` remembers the prompt and model; a folder made for another prompt is reported, not mixed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nbkit.data import images as data
from nbkit.env import runtime
from nbkit.env.colab import drive_folder
from nbkit.models.parts import SDParts, pipeline
from nbkit.paths import cache_dir
from nbkit.safeio import atomic_path
from nbkit.sample.sampling import generate

META = ".nbkit_class.json"


def ensure_class_images(parts: SDParts, prompt: str, folder: str | Path, count: int, resolution: int, *,
                        seed: int = 0, batch_size: int = 4, steps: int = 50, guidance: float = 7.5,
                        scheduler: str = "ddim", device=None, dtype=None, verbose: bool = True) -> list[Path]:
    """Make sure `folder` holds at least `count` class images; generate the missing ones with `parts`.

    `device`/`dtype` default to this machine's GPU in its mixed precision (fp16 on a T4), else the CPU in fp32.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / META
    meta = {"prompt": prompt, "model": parts.source, "resolution": resolution}
    have, _ = data.scan(folder, "class")
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("prompt") != prompt and have:
            raise data.DataError(
                f"{folder} holds {len(have)} class images made for {old.get('prompt')!r}, not {prompt!r}. "
                "Use another class_dir for this prompt, or empty the folder to regenerate."
            )
    if len(have) >= count:
        if verbose:
            print(f"class images for {prompt!r}: {count} reused from {folder} (none generated)")
        return have[:count]
    meta_path.write_text(json.dumps(meta))
    if device is None or dtype is None:
        rt = runtime.detect()
        device = device or rt.device
        if dtype is None:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(rt.default_precision(), torch.float32)
    moved = {n: next(m.parameters()).device for n, m in parts.networks.items()}
    modes = {n: getattr(parts, n).training for n in moved}
    for n in moved:
        getattr(parts, n).to(device).eval()  # no dropout in the pictures, whatever the parts were doing before
    pipe = pipeline(parts, scheduler)
    missing = [i for i in range(count) if not (folder / f"class_{i:05d}.png").exists()]
    try:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            for k in tqdm(range(0, len(missing), batch_size), desc="class images"):
                idx = missing[k:k + batch_size]
                images = generate(pipe, prompt, seeds=[seed * 10_000 + i for i in idx], steps=steps,
                                  guidance=guidance, size=resolution, batch_size=batch_size)
                for i, im in zip(idx, images):
                    with atomic_path(folder / f"class_{i:05d}.png") as tmp:
                        im.save(tmp, format="PNG")
    finally:
        for n, d in moved.items():
            getattr(parts, n).to(d).train(modes[n])
    have, _ = data.scan(folder, "class")
    if verbose:
        print(f"class images for {prompt!r}: {len(missing)} generated, {count - len(missing)} reused, in {folder}")
    return have[:count]


def default_class_dir(prompt: str, model_source: str, resolution: int, *, root: str | Path | None = None,
                      steps: int = 50, guidance: float = 7.5, scheduler: str = "ddim") -> Path:
    """The cache folder for class images of `prompt` made by `model_source` with these sampling settings.

    The name holds the prompt (readable) and a hash of model, resolution and sampler settings, so a change of
    any of them gets a fresh folder and a rerun with the same ones reuses the images. Root: the kit's cache.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48] or "class"
    key = hashlib.sha256(json.dumps([str(model_source), resolution, steps, guidance, scheduler]).encode()).hexdigest()
    return Path(root or cache_dir() / "class_images") / f"{slug}-{key[:10]}"


@dataclass(frozen=True)
class ClassImages:
    """Where the class images are and how many to use."""

    folder: Path
    count: int
    generated: bool  # True: made by the model (cached in `folder`); False: the user's own pictures
    note: str  # one line for the student: where they come from

    def train_settings(self) -> dict:
        """The TrainConfig settings for these class images."""
        return dict(class_dir=str(self.folder), num_class_images=self.count)


def choose_class_images(source: str, prompt: str, model_source: str, resolution: int, count: int, *,
                        cache_root: str | Path | None = None, drive_subfolder: str = "", steps: int = 50,
                        guidance: float = 7.5, scheduler: str = "ddim") -> ClassImages:
    """Decide where the class images come from.

    source="generate": the model makes `count` of them, kept in a folder keyed by prompt, model and settings
    (in Google Drive under `drive_subfolder` when that is set and Drive is available on Colab, else under
    `cache_root`, else the kit's cache), so the next run reuses them.
    source=<a folder>: the user's own class pictures; all of them (up to `count`) are used, none generated.
    """
    if count < 1:
        raise ValueError(f"count={count}: ask for at least 1 class image (the guide uses ~200).")
    if source.strip().lower() in ("generate", "auto", ""):
        root, where = cache_root, "the local cache"
        if drive_subfolder:
            drive_dir, why = drive_folder(drive_subfolder)
            print(why)
            if drive_dir is not None:
                root, where = drive_dir, "Google Drive"
        folder = default_class_dir(prompt, model_source, resolution, root=root, steps=steps, guidance=guidance,
                                   scheduler=scheduler)
        have = len(data.scan(folder, "class")[0]) if folder.is_dir() else 0
        return ClassImages(folder, count, True, f"{count} class images made by the model for {prompt!r}, kept in "
                                                f"{where} ({folder}); {min(have, count)} already there")
    folder = Path(source).expanduser()
    paths, problems = data.scan(folder, "class")  # raises DataError if the folder is missing
    if problems:
        raise data.DataError(f"Problems in your class folder {str(folder)!r}:\n  - " + "\n  - ".join(problems)
                             + "\nRemove these files, or use CLASS_IMAGES = 'generate'.")
    if not paths:
        raise data.DataError(f"Your class folder {str(folder)!r} has no images. Put pictures of the class there "
                             "(other dogs, not yours), or use CLASS_IMAGES = 'generate'.")
    n = min(count, len(paths))
    more = "" if len(paths) >= count else f" (fewer than the {count} asked; the guide uses ~200)"
    return ClassImages(folder, n, False, f"{n} of your own class pictures from {folder}{more}; none generated")
