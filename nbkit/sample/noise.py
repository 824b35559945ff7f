"""How noisy a picture is, measured: the energy of its finest detail (the noise remnants, speckle and blotches an
overfit model leaves), and how far a sampler's picture is from a same-seed, many-step reference.

Deterministic samplers (DDIM, PNDM, LMS, Euler, DPM-Solver, UniPC) all solve the same equation from the same
starting noise: with enough steps they reach the same picture. So the distance of a few-step picture to a
many-step one is the error the sampler's steps leave, and the high-frequency energy says whether that error looks
like noise. An ancestral sampler (Euler a) adds fresh noise at every step and converges to no single picture.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def high_frequency_energy(image: Image.Image, cutoff: float = 0.5) -> float:
    """RMS of the image's fine detail, in pixel units (0 = none, 1 = the full black-to-white range): the part of its
    spectrum (2-D FFT of each RGB channel) above `cutoff` x the finest frequency a pixel grid holds (Nyquist; 0.5:
    patterns of under 4 pixels). Grain, speckle and noise patches live there; flat areas and smooth shapes have
    almost none (a sharp edge has some, so compare pictures of the same scene: the same prompt and seed)."""
    if not 0 < cutoff < 1.42:
        raise ValueError(f"cutoff={cutoff}: give a fraction of the Nyquist frequency between 0 and 1.41.")
    a = _pixels(image)
    a = np.concatenate([a, a[::-1]], 0)
    a = np.concatenate([a, a[:, ::-1]], 1)  # mirrored: periodic without a jump at the borders, which the FFT would see
    h, w = a.shape[:2]
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]) / 0.5  # 1 = Nyquist along an axis
    spectrum = np.abs(np.fft.fft2(a, axes=(0, 1))) ** 2
    power = spectrum[radius > cutoff].sum() / (h * w) ** 2 / 3  # Parseval: the mean square of the high-pass image
    return float(np.sqrt(power))


def mean_high_frequency(images: list[Image.Image], cutoff: float = 0.5) -> float:
    """high_frequency_energy averaged over pictures (e.g. one per seed)."""
    if not images:
        raise ValueError("mean_high_frequency needs at least one image.")
    return float(np.mean([high_frequency_energy(im, cutoff) for im in images]))


def reference_distance(images: list[Image.Image], reference: list[Image.Image]) -> float:
    """RMS pixel difference (0 = identical, 1 = black vs white) between each picture and the reference of its seed
    (e.g. the same prompt and seed through DDIM at 250 steps), averaged over the pictures."""
    if len(images) != len(reference) or not images:
        raise ValueError(f"compare equally long, non-empty lists (got {len(images)} and {len(reference)} images).")
    return float(np.mean([np.sqrt(((_pixels(a) - _pixels(b)) ** 2).mean()) for a, b in zip(images, reference)]))
