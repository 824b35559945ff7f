"""Comparisons on the same seeds: labelled side-by-side grids, a scheduler x steps grid with timings, and two
measured distances (how far samples or prompt embeddings moved between two models).

Every comparison in the course holds everything fixed but one thing (the model, the scheduler, the number of
steps), so that what differs in the pictures is caused by that one thing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from nbkit.sample.sampling import generate, grid, make_scheduler, timed_generate

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size)  # scalable where Pillow has FreeType (>= 10.1)
    except TypeError:  # older Pillow: a fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def side_by_side(rows: dict[str, list[Image.Image]], col_labels: list[str] | None = None,
                 captions: dict[str, list[str]] | None = None, cell: int | None = None,
                 title: str | None = None) -> Image.Image:
    """One labelled image: a row per key of `rows` (label on the left), optional column labels on top and a
    caption under each cell. Cells are resized so their short side is `cell` px (default: as they are, but at
    least 128 px, so 64 px offline pictures stay legible). Missing cells are left blank."""
    if not rows or not any(rows.values()):
        raise ValueError("side_by_side needs at least one row with one image.")
    first = next(im for ims in rows.values() for im in ims)
    ncols = max(len(v) for v in rows.values())
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"{len(col_labels)} column labels for {ncols} columns: give one label per column.")
    w0, h0 = first.size
    scale = (cell / min(w0, h0)) if cell else max(1.0, 128 / min(w0, h0))
    cw, ch = round(w0 * scale), round(h0 * scale)
    fs = max(11, min(22, ch // 9))
    font = _font(fs)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = fs // 2
    label_w = max(_text_size(probe, k, font)[0] for k in rows) + 2 * pad
    top = (fs + 2 * pad) if col_labels else 0
    top += (fs + 2 * pad) if title else 0
    cap_h = (fs + pad) if captions else 0
    W, H = label_w + ncols * (cw + pad), top + len(rows) * (ch + cap_h + pad)
    out = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(out)
    y = pad
    if title:
        draw.text((pad, y), title, fill=INK, font=font)
        y += fs + 2 * pad
    if col_labels:
        for c, lab in enumerate(col_labels):
            tw = _text_size(draw, lab, font)[0]
            draw.text((label_w + c * (cw + pad) + (cw - tw) // 2, y), lab, fill=INK, font=font)
    for r, (lab, images) in enumerate(rows.items()):
        y0 = top + r * (ch + cap_h + pad)
        draw.text((pad, y0 + ch // 2 - fs // 2), lab, fill=INK, font=font)
        for c, im in enumerate(images):
            x0 = label_w + c * (cw + pad)
            out.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST if scale >= 2 else Image.BICUBIC), (x0, y0))
            if captions and c < len(captions.get(lab, [])):
                text = captions[lab][c]
                tw = _text_size(draw, text, font)[0]
                draw.text((x0 + (cw - tw) // 2, y0 + ch + pad // 2), text, fill=INK, font=font)
    return out


def pixel_distance(before: list[Image.Image], after: list[Image.Image]) -> float:
    """Mean absolute pixel difference (0 = identical, 1 = black vs white) between two equally long lists of
    images made from the same prompts and seeds: how far a model's pictures moved."""
    if len(before) != len(after) or not before:
        raise ValueError(f"compare equally long, non-empty lists (got {len(before)} and {len(after)} images).")
    d = [np.abs(np.asarray(a.convert("RGB"), dtype=np.float32) - np.asarray(b.convert("RGB"), dtype=np.float32)).mean()
         for a, b in zip(before, after)]
    return float(np.mean(d) / 255.0)


@torch.no_grad()
def embedding_shift(tokenizer, text_encoder_a, text_encoder_b, prompts: list[str]) -> dict[str, float]:
    """For each prompt, 1 - cosine similarity of its text embeddings (all 77 token states) under two text
    encoders: 0 = the prompt means exactly the same to both. Shows which prompts a trained text encoder moved."""
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    out = {}
    ea = text_encoder_a(ids.to(text_encoder_a.device))[0].float().flatten(1).cpu()
    eb = text_encoder_b(ids.to(text_encoder_b.device))[0].float().flatten(1).cpu()
    for p, a, b in zip(prompts, ea, eb):
        out[p] = float(1 - torch.nn.functional.cosine_similarity(a, b, dim=0))
    return out


@dataclass
class SchedulerGrid:
    """Images and seconds per image for every (scheduler, steps) cell, all from the same prompt and seeds."""

    prompt: str
    schedulers: list[str]
    steps: list[int]
    seeds: list[int]
    images: dict[tuple[str, int], list[Image.Image]] = field(default_factory=dict)
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)  # per image

    def missing(self) -> list[tuple[str, int]]:
        """Cells without one image per seed or without a timing (empty when the grid is complete)."""
        return [(s, n) for s in self.schedulers for n in self.steps
                if len(self.images.get((s, n), [])) != len(self.seeds) or (s, n) not in self.seconds]

    def image(self, cell: int | None = None) -> Image.Image:
        """The grid as one labelled picture: a row per scheduler, a column per steps count (the seeds side by
        side inside a cell), each cell captioned with its seconds per image."""
        strips = {s: [grid(self.images[(s, n)], rows=1) for n in self.steps] for s in self.schedulers}
        caps = {s: [f"{self.seconds[(s, n)]:.2f} s/img" for n in self.steps] for s in self.schedulers}
        return side_by_side(strips, [f"{n} steps" for n in self.steps], caps, cell=cell, title=self.prompt)

    def table(self) -> str:
        """Seconds per image as a text table (scheduler x steps)."""
        head = f"{'scheduler':<10}" + "".join(f"{f'{n} steps':>12}" for n in self.steps)
        lines = [head] + [f"{s:<10}" + "".join(f"{self.seconds[(s, n)]:>10.3f} s" for n in self.steps)
                          for s in self.schedulers]
        return "\n".join(lines)

    def save(self, folder: str | Path, name: str = "scheduler_grid") -> dict[str, Path]:
        """Write `name.png` (the labelled grid), `name.json` (every cell's timing and image files) and each
        cell's images as `name/<scheduler>_<steps>_seed<seed>.png`."""
        folder = Path(folder)
        cells_dir = folder / name
        cells_dir.mkdir(parents=True, exist_ok=True)
        cells = []
        for s in self.schedulers:
            for n in self.steps:
                files = []
                for seed, im in zip(self.seeds, self.images[(s, n)]):
                    p = cells_dir / f"{s}_{n:03d}_seed{seed}.png"
                    im.save(p)
                    files.append(str(p.relative_to(folder)))
                cells.append({"scheduler": s, "steps": n, "seconds_per_image": self.seconds[(s, n)], "images": files})
        png, js = folder / f"{name}.png", folder / f"{name}.json"
        self.image().save(png)
        js.write_text(json.dumps({"prompt": self.prompt, "schedulers": self.schedulers, "steps": self.steps,
                                  "seeds": self.seeds, "cells": cells}, indent=1))
        return {"grid": png, "timings": js, "cells": cells_dir}


def scheduler_grid(pipe, prompt: str, schedulers: list[str], steps: list[int], seeds: list[int], *,
                   guidance: float = 7.5, size: int | None = None, warmup: bool = True,
                   progress: bool = True) -> SchedulerGrid:
    """Sample `prompt` with every scheduler at every step count on the same seeds, timing each cell.

    The scheduler is swapped in place (`from_config`, no reload); the pipeline's own scheduler is put back at
    the end. One untimed warm-up image first, so the first cell does not pay for one-off start-up costs.
    """
    from tqdm.auto import tqdm

    if not schedulers or not steps or not seeds:
        raise ValueError("scheduler_grid needs at least one scheduler, one steps count and one seed.")
    original = pipe.scheduler
    g = SchedulerGrid(prompt, list(schedulers), [int(n) for n in steps], list(seeds))
    try:
        if warmup:
            pipe.scheduler = make_scheduler(g.schedulers[0], original.config)
            generate(pipe, prompt, seeds=g.seeds[:1], steps=min(g.steps), guidance=guidance, size=size)
        bar = tqdm(total=len(g.schedulers) * len(g.steps), desc="scheduler grid", disable=not progress)
        for s in g.schedulers:
            pipe.scheduler = make_scheduler(s, original.config)  # always from the model's own config
            for n in g.steps:
                g.images[(s, n)], g.seconds[(s, n)] = timed_generate(pipe, prompt, seeds=g.seeds, steps=n,
                                                                     guidance=guidance, size=size)
                bar.update()
        bar.close()
    finally:
        pipe.scheduler = original
    return g
