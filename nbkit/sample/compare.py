"""Comparisons on the same seeds: labelled side-by-side grids, a scheduler x steps grid with timings and noise
measures (nbkit.sample.noise), and two measured distances (how far samples or prompt embeddings moved between two
models).

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

from nbkit.sample.noise import mean_high_frequency, reference_distance
from nbkit.sample.sampling import ANCESTRAL, generate, grid, make_scheduler, timed_generate

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
    caption under each cell (a caption may have several lines). Cells are resized so their short side is `cell` px
    (default: as they are, but at least 128 px, so 64 px offline pictures stay legible). Missing cells are left
    blank."""
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
    cap_lines = max((t.count("\n") + 1 for caps in (captions or {}).values() for t in caps), default=0)
    cap_h = cap_lines * (fs + pad)
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
                for k, text in enumerate(captions[lab][c].split("\n")):
                    tw = _text_size(draw, text, font)[0]
                    draw.text((x0 + (cw - tw) // 2, y0 + ch + pad // 2 + k * (fs + pad)), text, fill=INK, font=font)
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
    """Images and seconds per image for every (scheduler, steps) cell, all from the same prompt and seeds, and each
    cell's noise measures (`measure()`): its high-frequency energy and its distance to the same seeds' reference
    pictures (`reference`: a scheduler and many steps, e.g. DDIM at 250), both averaged over the seeds."""

    prompt: str
    schedulers: list[str]
    steps: list[int]
    seeds: list[int]
    images: dict[tuple[str, int], list[Image.Image]] = field(default_factory=dict)
    seconds: dict[tuple[str, int], float] = field(default_factory=dict)  # per image
    reference: tuple[str, int] | None = None
    reference_images: list[Image.Image] = field(default_factory=list)
    measures: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)

    def missing(self) -> list[tuple[str, int]]:
        """Cells without one image per seed or without a timing (empty when the grid is complete)."""
        return [(s, n) for s in self.schedulers for n in self.steps
                if len(self.images.get((s, n), [])) != len(self.seeds) or (s, n) not in self.seconds]

    def measure(self) -> dict[tuple[str, int], dict[str, float]]:
        """Fill `measures`: per cell, "high_frequency" (nbkit.sample.noise.high_frequency_energy) and, with reference
        pictures, "distance" (nbkit.sample.noise.reference_distance); both 0..1, lower = cleaner."""
        for cell, images in self.images.items():
            m = {"high_frequency": mean_high_frequency(images)}
            if self.reference_images:
                m["distance"] = reference_distance(images, self.reference_images)
            self.measures[cell] = m
        return self.measures

    def cleanest(self, steps: int, by: str = "distance") -> list[tuple[str, float]]:
        """(scheduler, value) at `steps`, cleanest first, by "distance" or "high_frequency". Ancestral schedulers
        (fresh noise at every step: they converge to no single picture) are left out of the distance ranking."""
        rows = [(s, self.measures[(s, steps)][by]) for s in self.schedulers if by in self.measures.get((s, steps), {})
                and not (by == "distance" and s in ANCESTRAL)]
        return sorted(rows, key=lambda r: r[1])

    def summary(self) -> str:
        """One line per steps count: the schedulers from cleanest to noisiest, by each measure there is."""
        lines = []
        for by, what in (("distance", f"distance to {self._ref_label()}"), ("high_frequency", "high-frequency energy")):
            for n in self.steps:
                ranked = self.cleanest(n, by)
                if ranked:
                    lines.append(f"{n:>4} steps, {what}: " + " < ".join(f"{s} {v:.3f}" for s, v in ranked))
        return "\n".join(lines)

    def _ref_label(self) -> str:
        return f"{self.reference[0]} {self.reference[1]} steps" if self.reference else "no reference"

    def _caption(self, cell) -> str:
        m = self.measures.get(cell, {})
        noise = " ".join(f"{k} {m[key]:.3f}" for k, key in (("hf", "high_frequency"), ("ref", "distance")) if key in m)
        return f"{self.seconds[cell]:.2f} s/img" + (f"\n{noise}" if noise else "")

    def image(self, cell: int | None = None) -> Image.Image:
        """The grid as one labelled picture: a row per scheduler, a column per steps count (the seeds side by
        side inside a cell), each cell captioned with its seconds per image and, once measured, its
        high-frequency energy (hf) and distance to the reference (ref)."""
        strips = {s: [grid(self.images[(s, n)], rows=1) for n in self.steps] for s in self.schedulers}
        caps = {s: [self._caption((s, n)) for n in self.steps] for s in self.schedulers}
        return side_by_side(strips, [f"{n} steps" for n in self.steps], caps, cell=cell, title=self.prompt)

    def table(self) -> str:
        """Seconds per image, then each noise measure there is, as text tables (scheduler x steps)."""
        titles = {"high_frequency": "high-frequency energy", "distance": f"distance to {self._ref_label()}"}
        w = max(len(t) + 1 for t in [*self.schedulers, "seconds per image", *titles.values()])
        head = "".join(f"{f'{n} steps':>12}" for n in self.steps)
        out = [f"{'seconds per image':<{w}}" + head] + [
            f"{s:<{w}}" + "".join(f"{self.seconds[(s, n)]:>10.3f} s" for n in self.steps) for s in self.schedulers]
        for key, title in titles.items():
            if any(key in m for m in self.measures.values()):
                out += ["", f"{title:<{w}}" + head] + [f"{s:<{w}}" + "".join(
                    f"{self.measures.get((s, n), {}).get(key, float('nan')):>12.3f}" for n in self.steps)
                    for s in self.schedulers]
        return "\n".join(out)

    def save(self, folder: str | Path, name: str = "scheduler_grid") -> dict[str, Path]:
        """Write `name.png` (the labelled grid), `name.json` (every cell's timing, noise measures and image files)
        and each cell's images as `name/<scheduler>_<steps>_seed<seed>.png` (the reference's too)."""
        folder = Path(folder)
        cells_dir = folder / name
        cells_dir.mkdir(parents=True, exist_ok=True)

        def write(images, s, n):
            files = []
            for seed, im in zip(self.seeds, images):
                p = cells_dir / f"{s}_{n:03d}_seed{seed}.png"
                im.save(p)
                files.append(str(p.relative_to(folder)))
            return files

        cells = [{"scheduler": s, "steps": n, "seconds_per_image": self.seconds[(s, n)],
                  **self.measures.get((s, n), {}), "images": write(self.images[(s, n)], s, n)}
                 for s in self.schedulers for n in self.steps]
        ref = ({"scheduler": self.reference[0], "steps": self.reference[1],
                "images": write(self.reference_images, "reference_" + self.reference[0], self.reference[1])}
               if self.reference and self.reference_images else None)
        png, js = folder / f"{name}.png", folder / f"{name}.json"
        self.image().save(png)
        js.write_text(json.dumps({"prompt": self.prompt, "schedulers": self.schedulers, "steps": self.steps,
                                  "seeds": self.seeds, "reference": ref, "cells": cells}, indent=1))
        return {"grid": png, "timings": js, "cells": cells_dir}


def scheduler_grid(pipe, prompt: str, schedulers: list[str], steps: list[int], seeds: list[int], *,
                   guidance: float = 7.5, size: int | None = None, reference: tuple[str, int] | None = None,
                   warmup: bool = True, progress: bool = True) -> SchedulerGrid:
    """Sample `prompt` with every scheduler at every step count on the same seeds, timing each cell, and measure
    each cell's noise (SchedulerGrid.measure), against `reference` pictures when given: the same seeds through
    one scheduler at many steps, e.g. ("ddim", 250).

    The scheduler is swapped in place (`from_config`, no reload); the pipeline's own scheduler is put back at
    the end. One untimed warm-up image first, so the first cell does not pay for one-off start-up costs.
    """
    from tqdm.auto import tqdm

    if not schedulers or not steps or not seeds:
        raise ValueError("scheduler_grid needs at least one scheduler, one steps count and one seed.")
    original = pipe.scheduler
    g = SchedulerGrid(prompt, list(schedulers), [int(n) for n in steps], list(seeds),
                      reference=(reference[0], int(reference[1])) if reference else None)
    draw = dict(guidance=guidance, size=size)
    try:
        if warmup:
            pipe.scheduler = make_scheduler(g.schedulers[0], original.config)
            generate(pipe, prompt, seeds=g.seeds[:1], steps=min(g.steps), **draw)
        bar = tqdm(total=len(g.schedulers) * len(g.steps) + bool(reference), desc="scheduler grid",
                   disable=not progress)
        if g.reference:
            pipe.scheduler = make_scheduler(g.reference[0], original.config)
            g.reference_images = generate(pipe, prompt, seeds=g.seeds, steps=g.reference[1], **draw)
            bar.update()
        for s in g.schedulers:
            pipe.scheduler = make_scheduler(s, original.config)  # always from the model's own config
            for n in g.steps:
                g.images[(s, n)], g.seconds[(s, n)] = timed_generate(pipe, prompt, seeds=g.seeds, steps=n, **draw)
                bar.update()
        bar.close()
    finally:
        pipe.scheduler = original
    g.measure()
    return g
