"""A learner's folder of ordinary photos, in every awkward form a phone, a camera or a Mac hands over.

None shows the toy world (no flat shapes on plain backgrounds): smooth gradients with noise, as photos are.
`write_odd_photos(folder)` returns {file name: what the loader must make of it}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NON_ASCII = "chien été 日本.jpg"


def photo(size=(96, 72), seed=0) -> Image.Image:
    """An RGB picture that looks like a photo to a scorer: a colour gradient, blotches, sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([120 + 100 * x, 90 + 80 * y, 60 + 120 * (1 - x) * y], -1)
    blobs = sum(60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)[..., None] * rng.uniform(-1, 1, 3)
                for cx, cy in rng.uniform(0, 1, (4, 2)))
    arr = base + blobs + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_odd_photos(folder: str | Path, huge: tuple[int, int] = (6000, 4000)) -> dict[str, dict]:
    """Write the photos (and the junk a folder collects) into `folder`; {name: expectations} of the pictures.

    Expectations: "size" the loader's output size, "white" a pixel that must be white (transparency composited on
    white), "rgb" a pixel's colour (within a few levels)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, dict] = {}
    photo(seed=1).convert("CMYK").save(folder / "cmyk.jpg", quality=95)  # print shops and some scanners
    expect["cmyk.jpg"] = {"size": (96, 72)}
    photo(seed=2).convert("L").save(folder / "gray.png")
    expect["gray.png"] = {"size": (96, 72)}
    la = photo(seed=3).convert("LA")
    la.putalpha(Image.new("L", la.size, 255))
    la.putpixel((0, 0), (10, 0))  # one transparent corner
    la.save(folder / "gray_alpha.png")
    expect["gray_alpha.png"] = {"size": (96, 72), "white": (0, 0)}
    pal = photo(seed=4).quantize(64)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0  # palette index 0 is transparent (a GIF-style PNG)
    pal.save(folder / "palette.png", transparency=0)
    expect["palette.png"] = {"size": (96, 72), "white": (0, 0)}
    rgba = photo(seed=5).convert("RGBA")
    rgba.putpixel((5, 5), (0, 0, 0, 0))  # a cut-out: transparent black
    rgba.save(folder / "rgba.png")
    expect["rgba.png"] = {"size": (96, 72), "white": (5, 5)}
    Image.fromarray(np.full((72, 96), 65535, dtype=np.uint16)).save(folder / "deep16.png")  # 16-bit gray (I;16)
    expect["deep16.png"] = {"size": (96, 72), "rgb": ((0, 0), (255, 255, 255))}
    rot = photo((160, 80), seed=6)
    exif = rot.getexif()
    exif[0x0112] = 6  # a phone held upright: stored landscape, shown rotated 90 degrees
    rot.save(folder / "rotated.jpg", exif=exif, quality=95)
    expect["rotated.jpg"] = {"size": (80, 160)}
    photo(seed=7).save(folder / NON_ASCII, quality=95)
    expect[NON_ASCII] = {"size": (96, 72)}
    photo((huge[0] // 40, huge[1] // 40), seed=8).resize(huge).save(folder / "camera.jpg", quality=80)
    short = min(2048, min(huge))
    expect["camera.jpg"] = {"size": (round(huge[0] * short / min(huge)), round(huge[1] * short / min(huge)))}
    # what a Mac, a zip file and Jupyter leave behind: never pictures of the subject
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1junk")
    (folder / "._rotated.jpg").write_bytes(b"\0\5\26\7AppleDouble junk")
    (folder / ".ipynb_checkpoints").mkdir(exist_ok=True)
    photo(seed=9).save(folder / ".ipynb_checkpoints" / "gray-checkpoint.png")
    (folder / "__MACOSX").mkdir(exist_ok=True)
    (folder / "__MACOSX" / "._camera.jpg").write_bytes(b"junk")
    return expect
