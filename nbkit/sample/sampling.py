"""Sampling: images from fixed seeds, grids (the schedulers by name are nbkit.models.schedulers')."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from nbkit.env import runtime
from nbkit.errors import GENERATION_ADVICE, out_of_memory
from nbkit.models.schedulers import ANCESTRAL, SCHEDULERS, make_scheduler, set_scheduler  # noqa: F401 - importable from here too


@torch.no_grad()
def generate(pipe, prompts: str | list[str], seeds: list[int] | int = 0, steps: int = 50, guidance: float = 7.5,
             scheduler: str | None = None, size: int | None = None, negative_prompt: str | None = None,
             batch_size: int = 4) -> list:
    """One image per (prompt, seed), prompt-major; each image's noise (the starting latent, and the fresh noise
    an ancestral scheduler adds at every step) depends only on its seed.

    A pipeline whose parts have different precisions (after training: fp32 trained UNet, fp16 frozen text
    encoder and VAE) samples under autocast in the lower precision, as the training loop's validation does.
    Out of GPU memory, raises nbkit.errors.OutOfMemory naming what to change, with the memory of the failed batch freed.
    """
    if scheduler:
        set_scheduler(pipe, scheduler)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    jobs = [(p, s) for p in prompts for s in seeds]
    device = pipe._execution_device
    with _autocast(pipe, device):
        return _generate_jobs(pipe, jobs, steps, guidance, size, negative_prompt, batch_size, device)


def _autocast(pipe, device):
    """Parts of mixed precision (after training: fp32 trained UNet or adapters, fp16 frozen VAE) sample under autocast
    in the lower one; an all-fp32 pipeline on a GPU (a freshly loaded model's "before" pictures) in the GPU's mixed
    precision, fp16 on a T4 (pure fp32 is ~4x slower there); elsewhere as it is."""
    # every parameter's dtype, not a module's first: LoRA's fp32 adapters sit in an fp16 UNet
    nets = [getattr(pipe, n, None) for n in ("unet", "text_encoder", "text_encoder_2", "vae")]
    dtypes = {p.dtype for m in nets if m is not None for p in m.parameters()}
    low = sorted((d for d in dtypes if d in (torch.float16, torch.bfloat16)), key=str)
    if len(dtypes) > 1 and low:
        return torch.autocast(device.type, dtype=low[0], cache_enabled=False)
    rt = runtime.detect()
    if dtypes == {torch.float32} and rt.gpu_path and device.type == ("cuda" if rt.device == "cuda" else "cpu"):
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}[rt.default_precision()]
        return torch.autocast(device.type, dtype=half, cache_enabled=False)
    return contextlib.nullcontext()


def _generate_jobs(pipe, jobs, steps, guidance, size, negative_prompt, batch_size, device) -> list:
    images = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        latents = torch.stack([
            torch.randn((pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor),
                        generator=g) for g in gens
        ]).to(device=device, dtype=pipe.unet.dtype)
        # the same generators then draw any noise the scheduler adds on the way (Euler ancestral): still one seed
        with out_of_memory("generating images", GENERATION_ADVICE):
            out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, height=size,
                       width=size, latents=latents, generator=gens,
                       negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None)
        images += out.images
    return images


def timed_generate(pipe, *args, **kwargs) -> tuple[list, float]:
    """generate(), plus the seconds per image."""
    t = time.perf_counter()
    images = generate(pipe, *args, **kwargs)
    return images, (time.perf_counter() - t) / max(1, len(images))


def grid(images: list, rows: int | None = None, cols: int | None = None):
    """An image grid (diffusers' make_image_grid); rows x cols defaults to one row."""
    if rows is None and cols is None:
        rows, cols = 1, len(images)
    elif rows is None:
        rows = -(-len(images) // cols)
    elif cols is None:
        cols = -(-len(images) // rows)
    blank = images[0].copy()
    blank.paste((255, 255, 255), (0, 0, *blank.size))
    return make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def save_images(images: list, folder: str | Path, prefix: str = "image") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"{prefix}_{i:03d}.png")
        im.save(paths[-1])
    return paths
