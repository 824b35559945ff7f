"""The planner's two peaks outside the training step: caching the latents (before the first step) and sampling the
validation pictures (between steps). `torch.cuda.max_memory_allocated` over a run is the largest of the three.

* **Caching the latents** (`cache_latents`, nbkit.training.batches): every network is already on the GPU (the
  UNet and text encoders as they will train, LoRA's adapters made) and the VAE encodes the training pictures a
  few at a time (nbkit.training.batches.encode_chunk: 8 at 512 px in half precision, 1 at 1024 in fp32), in its
  own precision (SDXL's: fp32, force_upcast); then it leaves the GPU. The optimizer state and the gradients do
  not exist yet.
* **Validation samples** (validation_prompts and validation_steps > 0): the VAE comes back and decodes up to four
  pictures at once (nbkit.sample.generate's batch) next to everything training holds but the gradients (freed by
  zero_grad before). The UNet's sampling activations (no gradients, a few hundred MB) are left out.

The VAE's encode / decode peaks come from `nbkit.memory.memtrace` (the calibration's `vae_encode_per_image` and
`vae_decode_per_image`, one picture at the reference size, in `vae_dtype`), scaled by pixels and pictures.
"""

from __future__ import annotations

from nbkit.training.batches import encode_chunk

SAMPLE_BATCH = 4  # nbkit.sample.sampling.generate's batch_size: pictures decoded at once


def vae_bytes_per_element(arch, cfg, precision: str) -> int:
    """The VAE's precision in the run: fp32 where its config says force_upcast (SDXL's own VAE; a swapped-in VAE,
    TrainConfig.vae, is assumed to be an fp16-safe one), else the run's half precision."""
    if (arch.vae_fp32 and not getattr(cfg, "vae", "")) or precision == "fp32":
        return 4
    return 2


def _vae_run(arch, cal: dict, what: str, images: int, latent: int, bpe: int) -> int:
    per = cal.get(f"vae_{what}_per_image")
    if per is None and what == "decode":  # an older calibration: the decoder as about twice the encoder
        per = 2 * cal.get("vae_encode_per_image", 0)
    if not per:
        return 0
    calibrated = 4 if cal.get("vae_dtype") == "fp32" else 2
    return int(per * images * (latent / cal["reference_latent"]) ** 2 * bpe / calibrated)


def caching(arch, cal: dict, cfg, resident: int, precision: str, workspace: int) -> tuple[int, str]:
    """(peak allocated while the latents are cached, what it is); (0, "") when latents are not cached.
    resident: the weights on the GPU then (the planner's weight rows)."""
    if not cfg.cache_latents:
        return 0, ""
    bpe = vae_bytes_per_element(arch, cfg, precision)
    n = encode_chunk(cfg.resolution ** 2, bpe == 4)  # the loop's own rule
    enc = _vae_run(arch, cal, "encode", n, cfg.resolution // arch.vae_factor, bpe)
    vae = arch.vae * bpe
    return resident + vae + enc + workspace, (
        f"caching the latents (before the first step): the weights, the VAE ({'fp32' if bpe == 4 else 'fp16/bf16'}, "
        f"{vae / 2**30:.2f} GiB) encoding {n} picture(s) of {cfg.resolution} px at once ({enc / 2**30:.2f} GiB)")


def validation(arch, cal: dict, cfg, held: int, precision: str, workspace: int) -> tuple[int, str]:
    """(peak allocated while validation pictures are sampled, what it is); (0, "") without validation.
    held: what training keeps between steps (weights, optimizer state, EMA)."""
    if not (cfg.validation_prompts and cfg.validation_steps):
        return 0, ""
    bpe = vae_bytes_per_element(arch, cfg, precision)
    n = 1 if arch.vae_fp32 else min(SAMPLE_BATCH, len(cfg.validation_prompts) * cfg.num_validation_images)
    # (SDXL's pipelines decode one picture at a time: nbkit.models.sdxl enables the VAE's slicing)
    dec = _vae_run(arch, cal, "decode", n, cfg.resolution // arch.vae_factor, bpe)
    vae = arch.vae * bpe
    return held + vae + dec + workspace, (
        f"validation samples (every {cfg.validation_steps} steps): the weights and optimizer state, the VAE back on "
        f"the GPU decoding {n} picture(s) of {cfg.resolution} px at once ({dec / 2**30:.2f} GiB)")
