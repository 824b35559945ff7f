"""Several subjects in one run (TrainConfig.concepts_list, as ShivamShrirao's `concepts_list` and kohya's folders):
each concept's pictures and prompt, and with prior preservation its own class images, made in its own class folder.

The pictures of every concept are loaded into one list (instance, then class pictures), each concept remembering
its rows; a micro-step draws one concept (`pick`), all of its pictures from that concept, and its class pictures
from that concept's class images. The concepts come in turn, in a fresh seeded order each round (every concept
once a round), and each concept's own pictures in a fresh seeded order each of its epochs: a pure function of
(seed, micro-step), so a resumed run draws what the first would have. One concept is today's single subject:
concept 0 at every micro-step, its draw number the micro-step itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

from nbkit.config import TrainConfig
from nbkit.data import images as data


@dataclass
class Group:
    """One concept's rows among the loaded pictures."""

    instance: list[int]  # indices into Loaded.instance
    classes: list[int] = field(default_factory=list)  # indices into Loaded.class_ex (prior preservation)


@dataclass
class Loaded:
    """Every concept's pictures and prompts, one list each, and which rows are whose."""

    instance: list  # data.Example
    inst_prompts: list[str]
    class_ex: list
    class_prompts: list[str]
    groups: list[Group]


def load(cfg: TrainConfig, parts, main_process_first, device, dtype, expand: Callable[[str], str]) -> Loaded:
    """Load each concept's pictures (a caption file wins over its prompt) and, with prior preservation, make or
    reuse its num_class_images class images in its own class folder. `main_process_first`: accelerate's context
    (one process generates, the others then find them cached); `expand`: the prompt as the text encoder reads it."""
    out = Loaded([], [], [], [], [])
    for c in cfg.concepts():
        instance = data.load_folder(c.instance_dir, cfg.resolution, "instance")
        group = Group(list(range(len(out.instance), len(out.instance) + len(instance))))
        out.instance += instance
        out.inst_prompts += [expand(e.caption or c.instance_prompt) for e in instance]
        if cfg.with_prior_preservation:
            from nbkit.data.class_images import ensure_class_images

            with main_process_first():
                ensure_class_images(parts, c.class_prompt, c.class_dir, cfg.num_class_images, cfg.resolution,
                                    seed=cfg.seed, batch_size=cfg.class_batch_size, steps=cfg.sample_steps,
                                    guidance=cfg.guidance_scale, scheduler=cfg.sample_scheduler,
                                    device=device, dtype=dtype)
            class_ex = data.load_folder(c.class_dir, cfg.resolution, "class")[: cfg.num_class_images]
            group.classes = list(range(len(out.class_ex), len(out.class_ex) + len(class_ex)))
            out.class_ex += class_ex
            out.class_prompts += [c.class_prompt] * len(class_ex)
        out.groups.append(group)
    return out


def pick(groups: list[Group], micro: int, seed: int) -> tuple[Group, int]:
    """The concept of a micro-step and how many times it was drawn before (its own step count): round-robin in a
    fresh seeded order each round. One concept: it, and `micro`."""
    n = len(groups)
    if n == 1:
        return groups[0], micro
    return groups[data.batch_indices(n, 1, micro, seed + 2)[0]], micro // n


def fingerprint(groups: list[Group]) -> dict:
    """With several concepts, what the checkpoints also check: how the pictures split into concepts ({} with one:
    a single subject's fingerprint stays as it was)."""
    if len(groups) < 2:
        return {}
    shape = json.dumps([[len(g.instance), len(g.classes)] for g in groups]).encode()
    return {"concepts": {"count": len(groups), "sha256": hashlib.sha256(shape).hexdigest()}}
