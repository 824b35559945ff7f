"""Class images for prior preservation: made by the model itself, cached on disk, reused on the next run.

Only the missing images are generated, each from its own seed, each written atomically (temp + rename), so an
interrupted generation resumes where it stopped and a half-written PNG is never trained on. A hidden
`.nbkit_class.json` remembers the prompt and model; a folder made for another prompt is reported, not mixed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from .models import SDParts, pipeline
from .sample import generate

META = ".nbkit_class.json"


def ensure_class_images(parts: SDParts, prompt: str, folder: str | Path, count: int, resolution: int, *,
                        seed: int = 0, batch_size: int = 4, steps: int = 50, guidance: float = 7.5,
                        scheduler: str = "ddim", device=None, dtype=torch.float32) -> list[Path]:
    """Make sure `folder` holds at least `count` class images; generate the missing ones with `parts`."""
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
        return have[:count]
    meta_path.write_text(json.dumps(meta))
    device = device or next(parts.unet.parameters()).device
    moved = {n: next(getattr(parts, n).parameters()).device for n in ("unet", "vae", "text_encoder")}
    for n in moved:
        getattr(parts, n).to(device)
    pipe = pipeline(parts, scheduler)
    missing = [i for i in range(count) if not (folder / f"class_{i:05d}.png").exists()]
    try:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            for k in tqdm(range(0, len(missing), batch_size), desc="class images"):
                idx = missing[k:k + batch_size]
                images = generate(pipe, prompt, seeds=[seed * 10_000 + i for i in idx], steps=steps,
                                  guidance=guidance, size=resolution, batch_size=batch_size)
                for i, im in zip(idx, images):
                    tmp = folder / f".class_{i:05d}.png.tmp"
                    im.save(tmp, format="PNG")
                    os.replace(tmp, folder / f"class_{i:05d}.png")
    finally:
        for n, d in moved.items():
            getattr(parts, n).to(d)
    have, _ = data.scan(folder, "class")
    return have[:count]
