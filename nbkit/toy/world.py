"""A procedural toy world: small pictures of coloured shapes, each with a caption.

It gives the kit data it can make itself (no photos of real people, no download): sample instance images
for the offline run, the vocabulary of the offline tokenizer, and (later) the pretraining set of the toy model.
Everything is deterministic from a seed.

Pretraining sees ordinary scenes only, captioned with the full grammar or with some words left out
(`varied_caption`), so the model also follows short prompts ("a photo of a star"), and some looks called by made-up
names (`NAMES`, `pretraining_caption`). Patterns never appear in
ordinary scenes: a subject's two-colour pattern is new to the model, as a student's dog is new to SD 1.5.
The toy judge (nbkit.toy.judge) learns the ground truth of `labels()`, patterns included (`patterned_scene`).

>>> scene = Scene(shape="star", colour="red", background="blue", size="small")
>>> scene.caption()
'a photo of a small red star on a blue background'
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SIZES = {"small": 0.28, "large": 0.42}  # radius as a fraction of the image side
BACKGROUNDS = ("blue", "green", "white", "black", "yellow", "purple")
PATTERNS = ("none", "stripes", "dots", "checks")
JITTER = 0.06  # largest centre offset, fraction of the side
TILT = 12.0  # largest rotation, degrees

# A subject never drawn in ordinary scenes: taught with DreamBooth / TI / LoRA from a handful of pictures.
# Each is a class shape with a two-colour pattern that ordinary scenes never have.
SUBJECTS = {
    "zwx": dict(shape="star", colour="orange", pattern=("stripes", (40, 80, 220))),
    "qlo": dict(shape="circle", colour="yellow", pattern=("dots", (140, 60, 180))),
    "vrk": dict(shape="heart", colour="red", pattern=("checks", (245, 245, 245))),
}

# Named things: made-up words that pretraining captions use for one shape in one colour ("a photo of dax heart" is
# always the same purple heart), as web captions name breeds, products and people. They teach the toy model what
# SD 1.5 learned from the web: a word in front of the class noun can carry the whole look. Without them the toy model
# learned to ignore every word it was not taught: its text encoder put "a photo of zwx star" at a distance of 1.4 from
# "a photo of a star" (adding "red" moves it ~30), so "zwx star" and "a star" were nearly one prompt for DreamBooth;
# with them, 5.7. Names are never identifiers (SUBJECTS).
NAMES = {
    "bix": ("circle", "red"), "dax": ("heart", "purple"), "mup": ("square", "green"), "fep": ("triangle", "white"),
    "wug": ("star", "blue"), "kiki": ("ring", "yellow"), "toma": ("circle", "black"), "zorp": ("heart", "orange"),
    "gazzer": ("square", "yellow"), "blicket": ("triangle", "red"), "lorp": ("star", "green"),
    "nim": ("ring", "purple"),
    "pim": ("circle", "white"), "rask": ("heart", "blue"), "tuv": ("square", "black"), "jex": ("triangle", "orange"),
    "moxi": ("star", "white"), "pell": ("ring", "red"), "quib": ("circle", "green"), "sorn": ("heart", "yellow"),
    "teeb": ("square", "purple"), "vlim": ("triangle", "blue"), "woz": ("star", "black"), "yerk": ("ring", "orange"),
}
_NAME_OF = {look: name for name, look in NAMES.items()}

# Words the tokenizer must know besides the captions': prompt words students type, class nouns of real
# DreamBooth runs, and rare identifiers. "sks" is there only so old prompts tokenize; the course avoids it.
EXTRA_WORDS = (
    "the an in at with and of by under next to beach forest snow city street table grass river sky night "
    "painting drawing sketch cartoon picture image style van gogh oil watercolor pencil wearing hat sitting "
    "standing floating swimming jumping dog cat person man woman toy pig head potato bag shoe cup vase "
    "high quality detailed blurry noisy sks ohwx tok shape thing object pattern stripes dots checks"
)


@dataclass(frozen=True)
class Scene:
    """One picture of the toy world: what is drawn, and where."""

    shape: str
    colour: str
    background: str
    size: str = "large"
    dx: float = 0.0  # horizontal offset of the centre, fraction of the side
    dy: float = 0.0  # vertical offset of the centre, fraction of the side
    angle: float = 0.0  # rotation in degrees
    pattern: tuple | None = None  # (kind, rgb) for subjects only
    identifier: str | None = None  # the subject's rare word, if this is a subject

    def caption(self) -> str:
        """A caption from the world's grammar; subjects are named '<identifier> <class>'."""
        noun = f"{self.identifier} {self.shape}" if self.identifier else f"{self.size} {self.colour} {self.shape}"
        return f"a photo of a {noun} on a {self.background} background"

    def render(self, size: int = 64) -> Image.Image:
        """Draw the scene (supersampled 4x, then downsized, for smooth edges)."""
        s = size * 4
        img = Image.new("RGB", (s, s), COLOURS[self.background])
        r = SIZES[self.size] * s
        cx, cy = s / 2 + self.dx * s, s / 2 + self.dy * s
        mask = Image.new("L", (s, s), 0)
        _draw_shape(ImageDraw.Draw(mask), self.shape, cx, cy, r, self.angle)
        img.paste(COLOURS[self.colour], mask=mask)
        if self.pattern:
            kind, rgb = self.pattern
            pat = Image.new("L", (s, s), 0)
            _draw_pattern(ImageDraw.Draw(pat), kind, s, cx, cy, r)
            pat = Image.fromarray(_and(pat, mask))
            img.paste(rgb, mask=pat)
        return img.resize((size, size), Image.LANCZOS)


def _and(a: Image.Image, b: Image.Image):
    import numpy as np

    return np.minimum(np.asarray(a), np.asarray(b))


def _polygon(cx, cy, radii, n, angle):
    pts = []
    for i in range(n * len(radii)):
        rr = radii[i % len(radii)]
        t = math.radians(angle) + 2 * math.pi * i / (n * len(radii)) - math.pi / 2
        pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    return pts


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx, cy, r, angle):
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, [r * 1.1], 4, angle + 45), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, [r * 1.15], 3, angle), fill=255)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, [r * 1.15, r * 0.5], 5, angle), fill=255)
    elif shape == "heart":
        k = r * 0.55
        d.ellipse([cx - 2 * k, cy - 1.4 * k, cx, cy + 0.6 * k], fill=255)
        d.ellipse([cx, cy - 1.4 * k, cx + 2 * k, cy + 0.6 * k], fill=255)
        d.polygon([(cx - 1.95 * k, cy - 0.2 * k), (cx + 1.95 * k, cy - 0.2 * k), (cx, cy + 2.0 * k)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _draw_pattern(d: ImageDraw.ImageDraw, kind: str, s, cx, cy, r):
    step = max(4, int(r / 2.5))
    if kind == "stripes":
        for x in range(0, s, 2 * step):
            d.rectangle([x, 0, x + step - 1, s], fill=255)
    elif kind == "dots":
        for y in range(int(cy - r), int(cy + r), 2 * step):
            for x in range(int(cx - r), int(cx + r), 2 * step):
                d.ellipse([x, y, x + step, y + step], fill=255)
    elif kind == "checks":
        for y in range(0, s, step):
            for x in range(0, s, step):
                if (x // step + y // step) % 2 == 0:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=255)
    else:
        raise ValueError(f"unknown pattern {kind!r}")


def random_scene(rng: random.Random) -> Scene:
    """An ordinary scene (never a subject): shape, colour and background differ."""
    colour = rng.choice(list(COLOURS))
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    return Scene(
        shape=rng.choice(SHAPES), colour=colour, background=background, size=rng.choice(list(SIZES)),
        dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER), angle=rng.uniform(-TILT, TILT),
    )


def subject_scene(identifier: str, rng: random.Random, background: str | None = None) -> Scene:
    """A picture of one of the world's subjects, in a random pose on a random (or given) background."""
    spec = SUBJECTS[identifier]
    bg = background or rng.choice([b for b in BACKGROUNDS if b != spec["colour"]])
    return Scene(
        shape=spec["shape"], colour=spec["colour"], background=bg, size="large", pattern=spec["pattern"],
        identifier=identifier, dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER),
        angle=rng.uniform(-TILT, TILT),
    )


def subject_backgrounds(identifier: str) -> tuple[str, ...]:
    """The backgrounds a subject can be drawn on (all but its own colour)."""
    return tuple(b for b in BACKGROUNDS if b != SUBJECTS[identifier]["colour"])


def write_subject_images(folder: str | Path, identifier: str = "zwx", n: int = 5, size: int = 64, seed: int = 0,
                         backgrounds: tuple[str, ...] | None = None):
    """Write `n` pictures of a subject to `folder` as PNG (the kit's sample instance images).

    Backgrounds cycle through `backgrounds` (default: the subject's, in a seeded order), so a handful of pictures
    already shows the subject in different places, as good instance photos do.
    """
    rng = random.Random(seed)
    bgs = list(backgrounds or subject_backgrounds(identifier))
    if backgrounds is None:
        rng.shuffle(bgs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{identifier}_{i:02d}.png"
        subject_scene(identifier, rng, bgs[i % len(bgs)]).render(size).save(p)
        paths.append(p)
    return paths


def patterned_scene(rng: random.Random) -> Scene:
    """An ordinary scene with a random two-colour pattern (for the VAE and the judge, never the UNet)."""
    base = random_scene(rng)
    kind = rng.choice(PATTERNS[1:])
    rgb = COLOURS[rng.choice([c for c in COLOURS if c != base.colour])]
    return replace(base, pattern=(kind, rgb))


def varied_caption(scene: Scene, rng: random.Random) -> str:
    """The scene's caption with some words left out, as people write prompts (pretraining captions).

    Always names the shape; keeps the colour 85 %, the background 70 % and the size 50 % of the time.
    """
    words = [w for w, keep in ((scene.size, 0.5), (scene.colour, 0.85)) if rng.random() < keep]
    text = f"a photo of a {' '.join(words + [scene.shape])}"
    if rng.random() < 0.7:
        text += f" on a {scene.background} background"
    return text


def pretraining_caption(scene: Scene, rng: random.Random, named_share: float = 0.0) -> str:
    """A pretraining caption: for a scene whose shape and colour have a name (NAMES), the name `named_share` of the
    time ("a photo of dax heart", "a photo of a dax heart on a green background"), else `varied_caption`.

    With `named_share=0` it draws exactly what `varied_caption` draws (the first toy model's captions).
    """
    name = _NAME_OF.get((scene.shape, scene.colour))
    if name and named_share > 0 and rng.random() < named_share:
        text = f"a photo of {'a ' if rng.random() < 0.5 else ''}{name} {scene.shape}"
        return text + (f" on a {scene.background} background" if rng.random() < 0.7 else "")
    return varied_caption(scene, rng)


def labels(scene: Scene) -> dict[str, str]:
    """The ground truth the judge learns: shape, colour, background, size, pattern."""
    pattern = scene.pattern[0] if scene.pattern else "none"
    return dict(shape=scene.shape, colour=scene.colour, background=scene.background, size=scene.size, pattern=pattern)


def parse_prompt(prompt: str) -> dict[str, str]:
    """What a prompt of the world's grammar asks for: shape, colour, background, size, subject (if named).

    >>> parse_prompt("a photo of a zwx star on a green background")
    {'shape': 'star', 'background': 'green', 'subject': 'zwx'}
    """
    words = prompt.lower().replace(",", " ").split()
    out: dict[str, str] = {}
    bg = None
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in BACKGROUNDS:
            bg = i - 1
            out["background"] = words[bg]
    for i, w in enumerate(words):
        if i == bg:
            continue
        if w in SHAPES and "shape" not in out:
            out["shape"] = w
        elif w in COLOURS and "colour" not in out and "shape" not in out:
            out["colour"] = w
        elif w in SIZES and "size" not in out:
            out["size"] = w
        elif w in SUBJECTS:
            out["subject"] = w
    return out


def vocabulary() -> list[str]:
    """Every word of the world's grammar and of the extra prompt words, identifiers included."""
    words = set("a photo of on background".split())
    words |= set(SHAPES) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS) | set(SUBJECTS)
    words |= set(EXTRA_WORDS.split())
    return sorted(words)


def plain(scene: Scene) -> Scene:
    """The same scene without the subject's pattern (its class, as the world draws it)."""
    return replace(scene, pattern=None, identifier=None)
