"""Instance (and class) images from a folder, read the way a student's uploads need.

- hidden files and folders (`.ipynb_checkpoints`, `.DS_Store`, `__MACOSX`) are ignored;
- EXIF orientation is applied; any mode becomes RGB (transparency composited on white, 16-bit scaled);
- a `name.txt` next to `name.jpg` is that image's caption;
- anything that is not a readable image is reported by name, never silently dropped;
- an image smaller than the training resolution is upscaled, with a warning naming it (decided: a student's
  phone crop is better used than refused; the warning says the result may be soft);
- a big photo is downscaled as it is read, to a short side of MAX_SHORT_SIDE (a JPEG is decoded at 1/2 to 1/8
  scale directly): a 6000x4000 camera picture then takes 19 MB, not 72, and training crops it smaller anyway.
  One too large to decode safely (over twice PIL's MAX_IMAGE_PIXELS) is refused by name, with what to do.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
Image.MAX_IMAGE_PIXELS = 16_000 * 16_000  # bigger than any camera; PIL's own limit would call a 100 MP photo a bomb
MAX_SHORT_SIDE = 2048  # pictures are kept at most this on their short side (training and scoring use 64-1024)


class DataError(ValueError):
    """The image folder cannot be used as it is; the message lists every problem and what to do."""


@dataclass
class Example:
    path: Path
    image: Image.Image  # RGB, original size
    caption: str | None  # from name.txt, if there is one


def _ignored(p: Path, root: Path) -> bool:
    return any(part.startswith(".") or part in IGNORED_NAMES for part in p.relative_to(root).parts)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels become white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _shrink(img: Image.Image, short_side: int) -> Image.Image:
    """`img` with its short side at most `short_side` (aspect kept)."""
    w, h = img.size
    if min(w, h) <= short_side:
        return img
    scale = short_side / min(w, h)
    return img.resize((max(short_side, round(w * scale)), max(short_side, round(h * scale))), Image.LANCZOS)


def read_image(path: str | Path, max_short_side: int | None = MAX_SHORT_SIDE) -> Image.Image:
    """Open, check, orient (EXIF), convert to RGB and downscale to `max_short_side` (None: full size); raise
    DataError naming the file if that fails."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if max_short_side and min(w, h) > max_short_side:  # JPEG: decode at a fraction of the size, no bigger
                f = max_short_side / min(w, h)
                img.draft(None, (math.ceil(w * f), math.ceil(h * f)))
            img.load()  # reads every byte: a truncated file fails here, not mid-training
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            return _shrink(img, max_short_side) if max_short_side else img
    except Image.DecompressionBombError as err:
        raise DataError(f"{path.name}: too large to read safely ({err}). Resize it to a few thousand pixels a side "
                        "(training crops it to the training resolution anyway) or remove it.") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path.name}: cannot be read as an image ({err}). Re-export it as JPEG/PNG or "
                        "remove it.") from err


def scan(folder: str | Path, what: str = "instance") -> tuple[list[Path], list[str]]:
    """The image files of a folder (sorted, hidden ones ignored) and a list of problems with the rest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"The {what} folder {str(folder)!r} does not exist or is not a folder.")
    images, problems = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_dir() or _ignored(p, folder):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        elif p.suffix.lower() == ".txt" and any(p.with_suffix(s).exists()
                                                for s in IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES}):
            continue  # a caption
        else:
            problems.append(f"{p.relative_to(folder)}: not an image (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images, problems


def load_folder(folder: str | Path, resolution: int, what: str = "instance", skip_bad: bool = False) -> list[Example]:
    """Read every image of a folder; raise DataError listing all problems (or warn and skip them if skip_bad)."""
    paths, problems = scan(folder, what)
    examples = []
    for p in paths:
        try:
            img = read_image(p, max(MAX_SHORT_SIDE, resolution))
        except DataError as err:
            problems.append(str(err))
            continue
        if min(img.size) < resolution:
            warnings.warn(f"{p.name} is {img.size[0]}x{img.size[1]}, smaller than the training resolution "
                          f"{resolution}: it is upscaled and may look soft. Use pictures of at least {resolution} px.")
        cap = next((p.with_suffix(s) for s in (".txt", ".TXT") if p.with_suffix(s).exists()), None)
        examples.append(Example(p, img, cap.read_text(encoding="utf-8").strip() if cap else None))
    if problems and not skip_bad:
        raise DataError(f"Problems in the {what} folder {str(folder)!r}:\n  - " + "\n  - ".join(problems)
                        + "\nFix or remove these files (or pass skip_bad=True to train on the rest).")
    if problems:
        warnings.warn("Skipped: " + "; ".join(problems))
    if not examples:
        raise DataError(f"The {what} folder {str(folder)!r} has no images. Put 3-10 JPEG/PNG pictures of your "
                        "subject there (hidden files and folders are ignored).")
    return examples


def to_tensor(img: Image.Image, resolution: int | tuple[int, int], center_crop: bool = True, flip: bool = False,
              rng: np.random.Generator | None = None) -> torch.Tensor:
    """Resize to cover `resolution` (a square's side, or (height, width): an aspect-ratio bucket, nbkit.data.buckets),
    crop that out, maybe flip; a CHW tensor in [-1, 1]."""
    return to_tensor_sized(img, resolution, center_crop, flip, rng)[0]


def to_tensor_sized(img: Image.Image, resolution: int | tuple[int, int], center_crop: bool = True, flip: bool = False,
                    rng: np.random.Generator | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """to_tensor's picture, and its sizes as SDXL is conditioned on them (its `time_ids`): (original height, width,
    crop top, crop left, target height, width), the crop's corner in the resized picture as trained (mirrored with
    the flip), as diffusers' train_dreambooth_lora_sdxl.py computes them."""
    th, tw = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution, resolution)
    w0, h0 = img.size
    scale = max(th / h0, tw / w0)  # a square: its side over the short side
    img = img.resize((max(tw, round(w0 * scale)), max(th, round(h0 * scale))), Image.BICUBIC)
    w, h = img.size
    if center_crop or rng is None:
        left, top = (w - tw) // 2, (h - th) // 2
    else:
        left, top = int(rng.integers(0, w - tw + 1)), int(rng.integers(0, h - th + 1))
    img = img.crop((left, top, left + tw, top + th))
    if flip:
        img = ImageOps.mirror(img)
        left = w - tw - left
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), (h0, w0, top, left, th, tw)


def thumbnail(img: Image.Image, size: int) -> Image.Image:
    """A centre-cropped square of side `size` (what the model trains on, for display)."""
    return ImageOps.fit(img, (size, size), Image.BICUBIC)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Which examples form the batch of `step`: a fresh shuffle every epoch, a pure function of (seed, step).

    Being a function of the step (not of hidden iterator state) is what makes a resumed run see the same
    data as an uninterrupted one.
    """
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out
