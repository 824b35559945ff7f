"""The toy judge: a small classifier that knows the toy world's ground truth (the toy stand-in for CLIP/DINO).

It reads a 64 px picture and says which shape, colour, background, size and pattern it shows; from that come
the three numbers the course talks about:

- prompt fidelity: share of images that show what their prompt asks (shape, colour, background as named);
- subject fidelity: share of images that show the subject (its shape, colour and two-colour pattern);
- class drift: share of plain class-prompt images ("a photo of a star") that show the subject's pattern.

    import nbkit.toy.judge
    print(nbkit.toy.judge.scores(pipe, identifier="zwx", class_noun="star"))  # generates, judges, returns the three

Train it again with `python -m nbkit judge` (a few minutes on a CPU; writes data/judge/). It is trained on rendered
scenes only, blurred and tinted so that it also reads the imperfect pictures a diffusion model draws.
It judges the toy world: on SD 1.5 pictures its numbers mean nothing (`scores` refuses other models).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

from nbkit.models.offline import NEW_CONTEXTS, OFFLINE_RESOLUTION
from nbkit.paths import DATA_DIR
from nbkit.toy import world as toyworld

JUDGE_DIR = DATA_DIR / "judge"
HEADS = {
    "shape": list(toyworld.SHAPES),
    "colour": list(toyworld.COLOURS),
    "background": list(toyworld.BACKGROUNDS),
    "size": list(toyworld.SIZES),
    "pattern": list(toyworld.PATTERNS),
}


class Judge(nn.Module):
    """A small CNN (about 0.13 M parameters) with one classification head per attribute of `HEADS`."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.features = nn.Sequential(  # 64 -> 32 -> 16 (twice) -> 8 -> 4 px
            block(3, w, 2), block(w, 2 * w, 2), block(2 * w, 2 * w, 1), block(2 * w, 2 * w, 2), block(2 * w, 2 * w, 2),
        )
        feat = 2 * w * 3  # mean, max and centre pooling
        self.heads = nn.ModuleDict({k: nn.Linear(feat, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        c = h[:, :, 1:3, 1:3].mean(dim=(2, 3))
        z = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3)), c], 1)
        return {k: head(z) for k, head in self.heads.items()}


def to_batch(images) -> torch.Tensor:
    """PIL images (any size) -> a [n, 3, 64, 64] tensor in [-1, 1]."""
    arr = [np.asarray(im.convert("RGB").resize((OFFLINE_RESOLUTION,) * 2, Image.BILINEAR), dtype=np.float32)
           for im in images]
    return torch.from_numpy(np.stack(arr) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


_LOADED: dict[str, Judge] = {}


def load(folder: str | Path = JUDGE_DIR) -> Judge:
    """The shipped judge (cached after the first call)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    key = str(folder.resolve())
    if key not in _LOADED:
        path = folder / "judge.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"No judge weights at {path}. Train them with `python -m nbkit judge`.")
        meta = json.loads((folder / "judge.json").read_text())
        if meta["heads"] != HEADS:
            raise ValueError(f"{path} was trained for other labels than this toy world has: retrain with "
                             "`python -m nbkit judge`.")
        model = Judge(meta["width"])
        model.load_state_dict(load_file(path))
        _LOADED[key] = model.eval()
    return _LOADED[key]


@torch.no_grad()
def predict(images, judge: Judge | None = None, batch_size: int = 64) -> list[dict[str, str]]:
    """What the judge sees in each image: {'shape': 'star', 'colour': 'orange', ..., 'pattern': 'stripes'}."""
    judge = judge or load()
    out: list[dict[str, str]] = []
    images = list(images)
    for i in range(0, len(images), batch_size):
        logits = judge(to_batch(images[i:i + batch_size]))
        idx = {k: v.argmax(1).tolist() for k, v in logits.items()}
        out += [{k: HEADS[k][idx[k][j]] for k in HEADS} for j in range(len(idx["shape"]))]
    return out


def matches(seen: dict[str, str], prompt: str, attributes=("shape", "colour", "background")) -> bool:
    """Does what the judge saw agree with every attribute the prompt names (among `attributes`)?"""
    asked = toyworld.parse_prompt(prompt)
    return all(seen[a] == asked[a] for a in attributes if a in asked)


def is_subject(seen: dict[str, str], subject: str = "zwx") -> bool:
    """Does the image show the world's subject: its shape, its colour and its pattern?"""
    spec = toyworld.SUBJECTS[subject]
    return seen["shape"] == spec["shape"] and seen["colour"] == spec["colour"] and seen["pattern"] == spec["pattern"][0]


def prompt_fidelity(images, prompts, attributes=("shape", "colour", "background")) -> float:
    """Share of images showing what their prompt names (one prompt for all, or one per image)."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    seen = predict(images)
    return float(np.mean([matches(s, p, attributes) for s, p in zip(seen, prompts)]))


def subject_fidelity(images, subject: str = "zwx") -> float:
    """Share of images that show the subject (shape, colour and pattern all right)."""
    return float(np.mean([is_subject(s, subject) for s in predict(images)]))


def class_drift(images, subject: str = "zwx") -> float:
    """Share of (plain class-prompt) images that show the subject's pattern: the class has become the subject."""
    pattern = toyworld.SUBJECTS[subject]["pattern"][0]
    return float(np.mean([s["pattern"] == pattern for s in predict(images)]))


def scores(pipe_or_images, identifier: str = "zwx", class_noun: str = "star", subject: str = "zwx",
           contexts: tuple[str, ...] = NEW_CONTEXTS, seeds: int | list[int] = 8, steps: int = 25,
           guidance: float = 7.5, scheduler: str | None = None) -> dict[str, float]:
    """The three scores of a (fine-tuned) toy model, from fixed seeds.

    With a pipeline: draws `seeds` images for "a photo of <identifier> <class>" (subject fidelity), for the subject
    on each background of `contexts` (prompt fidelity in new contexts: shape and background), and for the plain
    class prompt "a photo of a <class>" (class drift). With a dict {"subject": [...], "context": ([...], prompts),
    "class": [...]} of images already drawn, only judges them.
    """
    if isinstance(pipe_or_images, dict):
        imgs = pipe_or_images
    else:
        from nbkit.sample.sampling import generate

        pipe = pipe_or_images
        if pipe.unet.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1)) != OFFLINE_RESOLUTION:
            raise ValueError("The toy judge only knows the toy world (64 px pictures of the offline model); this is "
                             "another model, whose pictures it cannot judge. Compare pictures by eye there.")
        seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        kw = dict(seeds=seeds, steps=steps, guidance=guidance, scheduler=scheduler, size=OFFLINE_RESOLUTION)
        ctx_prompts = [f"a photo of a {identifier} {class_noun} on a {bg} background" for bg in contexts]
        imgs = {
            "subject": generate(pipe, f"a photo of {identifier} {class_noun}", **kw),
            "context": (generate(pipe, ctx_prompts, **kw), [p for p in ctx_prompts for _ in seeds]),
            "class": generate(pipe, f"a photo of a {class_noun}", **kw),
        }
    ctx_images, ctx_prompts = imgs["context"]
    return {
        "subject_fidelity": subject_fidelity(imgs["subject"], subject),
        "prompt_fidelity": prompt_fidelity(ctx_images, ctx_prompts, ("shape", "background")),
        "class_drift": class_drift(imgs["class"], subject),
    }


def format_scores(table: dict[str, dict[str, float]]) -> str:
    """A small text table of scores() results, one row per model: {"before": scores(...), "after": ...}."""
    cols = (("subject_fidelity", "subject fidelity"), ("prompt_fidelity", "prompt fidelity (new contexts)"),
            ("class_drift", "class drift"))
    width = max(len(k) for k in table) + 2
    lines = [" " * width + " | ".join(c for _, c in cols)]
    for name, s in table.items():
        lines.append(name.ljust(width) + " | ".join(f"{s[k]:.0%}".center(len(c)) for k, c in cols))
    return "\n".join(lines)


# ---------------------------------------------------------------- training
def _degrade(img: Image.Image, rng: random.Random) -> Image.Image:
    """Blur, tint and noise: what a small diffusion model's pictures look like next to a clean render."""
    if rng.random() < 0.7:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.6)))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * np.array([rng.uniform(0.88, 1.12) for _ in range(3)], dtype=np.float32) + rng.uniform(-15, 15)
    nrng = np.random.default_rng(rng.randrange(2**32))
    arr = arr + nrng.normal(0, rng.uniform(0, 12), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def sample_scene(rng: random.Random) -> toyworld.Scene:
    """The judge's data: ordinary scenes, scenes with random patterns, and the subjects."""
    r = rng.random()
    if r < 0.45:
        return toyworld.random_scene(rng)
    if r < 0.85:
        return toyworld.patterned_scene(rng)
    return toyworld.subject_scene(rng.choice(list(toyworld.SUBJECTS)), rng)


def dataset(n: int, seed: int, degrade: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` rendered scenes (degraded when asked) and their labels as class indices."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [s.render(OFFLINE_RESOLUTION) for s in scenes]
    if degrade:
        images = [_degrade(im, rng) if rng.random() < 0.8 else im for im in images]
    y = {k: torch.tensor([HEADS[k].index(toyworld.labels(s)[k]) for s in scenes]) for k in HEADS}
    return to_batch(images), y


def accuracy(judge: Judge, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        logits = {k: [] for k in HEADS}
        for i in range(0, len(x), 256):
            for k, v in judge(x[i:i + 256]).items():
                logits[k].append(v)
    return {k: round((torch.cat(v).argmax(1) == y[k]).float().mean().item(), 4) for k, v in logits.items()}


def train_judge(out: Path = JUDGE_DIR, n: int = 5000, steps: int = 1500, batch: int = 64, lr: float = 2e-3,
                width: int = 32, seed: int = 0) -> dict:
    """Train the judge on rendered scenes, test it on held-out ones, save weights + metadata; return accuracies."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x, y = dataset(n, seed)
    xt, yt = dataset(1000, seed + 10_000, degrade=True)
    judge = Judge(width)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        xb = x[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        out_ = judge(xb)
        loss = sum(F.cross_entropy(out_[k], y[k][idx]) for k in HEADS)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 250 == 0:
            print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4),
                              "s": round(time.perf_counter() - t0)}), flush=True)
    judge.eval()
    acc = accuracy(judge, xt, yt)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out / "judge.safetensors"))
    meta = dict(heads=HEADS, width=width, seed=seed, n=n, steps=steps, batch=batch, lr=lr, held_out_accuracy=acc,
                seconds=round(time.perf_counter() - t0),
                command=f"python -m nbkit judge --n {n} --steps {steps} --seed {seed}")
    (out / "judge.json").write_text(json.dumps(meta, indent=2) + "\n")
    _LOADED.pop(str(out.resolve()), None)
    return acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nbkit judge", description="Train the toy judge; writes data/judge/.")
    p.add_argument("--out", default=str(JUDGE_DIR))
    p.add_argument("--n", type=int, default=5000, help="rendered training scenes")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print("held-out accuracy:", train_judge(Path(a.out), n=a.n, steps=a.steps, seed=a.seed))


if __name__ == "__main__":
    main()
