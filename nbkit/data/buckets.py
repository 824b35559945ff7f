"""Aspect-ratio buckets (TrainConfig.bucketing): a portrait or landscape photo trains at a shape near its own,
not centre-cropped to a square (which cuts the head or the feet off a standing subject).

- The buckets are (height, width) pairs of at most resolution^2 pixels, each side a multiple of what the model
  needs (`multiple_of`: the VAE's factor x the UNet's downsampling; SD 1.5: 8 x 8 = 64, the offline model 4 x 4
  = 16). cfg.buckets lists them ("h,w;h,w", diffusers' `parse_buckets_string` format); empty: `ladder`, diffusers'
  `generate_aspect_ratio_buckets` over aspects from 1:2 to 2:1 (SD 1.5 at 512: 512x512, 576x448, 640x384,
  704x320 and their transposes, like kohya's).
- Each picture goes to the bucket nearest its aspect (diffusers' `find_nearest_bucket`), is resized to cover it
  and centre-cropped to it (nbkit.data.images.to_tensor); its latents are cached at that size.
- A step's batch comes from one bucket (`batch_indices`, a pure function of (seed, step): the same order on resume).
  A batch always has train_batch_size pictures: a bucket with fewer pictures left (or in all) fills its batch
  with its own pictures again, in its shuffled order (decided: the loss and learning rate mean the same every step).
- Prior preservation: the class images stay square pictures (the model makes them at resolution x resolution);
  they are cropped to every bucket that holds instance pictures, so a step's class half has its instance half's
  shape (their latents: one set per such bucket).
- The memory planner sizes activations by resolution^2 pixels, which no bucket exceeds (config.validate checks
  the given ones); validation and sample pictures stay square at resolution.
"""

from __future__ import annotations

import math

import torch

# diffusers' default aspect ladder (width, height), from 1:2 to 2:1
ASPECTS = [(1, 1), (4, 5), (5, 4), (2, 3), (3, 2), (3, 4), (4, 3), (9, 16), (16, 9), (1, 2), (2, 1)]


def multiple_of(parts) -> int:
    """The pixel multiple each side of a training picture must be for this model: the VAE's downsampling times the
    UNet's (its latents must halve cleanly at every down block)."""
    return parts.vae_scale_factor * 2 ** (len(parts.unet.config.down_block_types) - 1)


def ladder(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """The default buckets: diffusers' generate_aspect_ratio_buckets for each of ASPECTS, each side a multiple of
    `multiple`; where rounding took one over resolution^2 pixels, it steps down a side (the one that keeps the
    aspect closest). Duplicates are dropped; the square comes first."""
    from diffusers.training_utils import generate_aspect_ratio_buckets

    out: list[tuple[int, int]] = []
    for aw, ah in ASPECTS:
        h, w = generate_aspect_ratio_buckets(resolution, multiple, base_resolutions=[(ah, aw)])[0]
        while h * w > resolution * resolution:
            h, w = min([(h - multiple, w), (h, w - multiple)], key=lambda s: abs(s[1] / s[0] - aw / ah))
        if (h, w) not in out:
            out.append((h, w))
    return out


def bucket_list(spec: str, resolution: int, multiple: int) -> list[tuple[int, int]]:
    """The run's buckets: `spec` ("h,w;h,w", checked by TrainConfig.validate) parsed by diffusers, or the ladder;
    a side that is not a multiple of `multiple` is a ConfigError saying which."""
    from nbkit.config import ConfigError

    if not spec.strip():
        return ladder(resolution, multiple)
    from diffusers.training_utils import parse_buckets_string

    sizes = parse_buckets_string(spec)
    bad = [f"{h},{w}" for h, w in sizes if h % multiple or w % multiple]
    if bad:
        raise ConfigError(f"buckets {'; '.join(bad)}: this model needs each side a multiple of {multiple} (its VAE "
                          f"and UNet downsample by that much). Round them, or leave buckets empty for the default set.")
    return sizes


def assign(sizes: list[tuple[int, int]], buckets: list[tuple[int, int]]) -> list[int]:
    """Each picture's bucket (an index into `buckets`) from its PIL size (width, height): the nearest aspect."""
    from diffusers.training_utils import find_nearest_bucket

    return [find_nearest_bucket(h, w, buckets) for w, h in sizes]


def describe(bucket_of: list[int], buckets: list[tuple[int, int]], batch_size: int) -> str:
    """One line for the run's log: how many pictures went to which bucket."""
    counts = {b: bucket_of.count(b) for b in sorted(set(bucket_of))}
    parts = ", ".join(f"{buckets[b][0]}x{buckets[b][1]} (h x w): {n}" for b, n in counts.items())
    few = [f"{buckets[b][0]}x{buckets[b][1]}" for b, n in counts.items() if n < batch_size]
    note = (f"; {', '.join(few)} hold(s) fewer than train_batch_size={batch_size}: their batches repeat their "
            "pictures" if few else "")
    return f"bucketing: {len(bucket_of)} pictures in {len(counts)} bucket(s): {parts}{note}."


def batch_indices(bucket_of: list[int], batch_size: int, step: int, seed: int) -> list[int]:
    """The pictures of `step`'s batch, all from one bucket: a pure function of (seed, step), like
    nbkit.data.images.batch_indices.

    Every epoch each bucket's pictures are shuffled and cut into batches of `batch_size`, the last one filled up
    from the start of the same shuffled order (so with fewer pictures than batch_size they repeat); then the
    epoch's batches are shuffled together. Each picture is seen once an epoch, besides those fill-ups.
    """
    groups = {b: [i for i, x in enumerate(bucket_of) if x == b] for b in sorted(set(bucket_of))}
    per_epoch = sum(math.ceil(len(g) / batch_size) for g in groups.values())
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = []
    for members in groups.values():
        order = [members[int(i)] for i in torch.randperm(len(members), generator=gen)]
        k = math.ceil(len(order) / batch_size)
        filled = [order[j % len(order)] for j in range(k * batch_size)]
        batches += [filled[j * batch_size:(j + 1) * batch_size] for j in range(k)]
    return batches[int(torch.randperm(len(batches), generator=gen)[pos])]
