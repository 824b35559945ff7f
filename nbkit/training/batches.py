"""The training pictures and prompts as the steps see them: loaded and checked once, latents encoded once (the VAE
then leaves the GPU), prompt embeddings computed once when the text encoder is frozen, and one batch per
(seed, micro-step), so a step is a pure function of its number and a resumed run draws what the first would have.
With bucketing (nbkit.data.buckets) each picture is cached at its aspect-ratio bucket's size and a batch comes from
one bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbkit.config import TrainConfig
from nbkit.data import buckets as bucketing
from nbkit.data import images as data
from nbkit.models.parts import SDParts
from nbkit.training import methods


@dataclass
class Batches:
    """Instance (and class) pictures, their prompts, and where their latents come from."""

    cfg: TrainConfig
    parts: SDParts
    device: torch.device
    weight_dtype: torch.dtype
    instance: list  # data.Example
    inst_prompts: list[str]
    class_ex: list
    class_prompts: list[str]
    inst_src: torch.Tensor | list  # [n, flips, ...]: latents (cache_latents) or pixels; bucketing: one per picture
    class_src: torch.Tensor | dict | None  # bucketing: {bucket: [n, flips, ...]} for each bucket instances are in
    cached_emb: dict[str, torch.Tensor] | None  # prompt -> embedding, when the text encoder is frozen
    flips: tuple[bool, ...]
    bucket_of: list[int] | None = None  # bucketing: each instance picture's bucket, an index into `buckets`
    buckets: list[tuple[int, int]] | None = None  # bucketing: the (height, width) of each bucket

    @property
    def prior(self) -> bool:
        return self.class_src is not None

    def fingerprint(self) -> dict:
        """What the checkpoints check a resumed run against: the same pictures with the same prompts."""
        from nbkit.training.checkpoint import data_fingerprint

        return data_fingerprint({"instance": [(e.path, p) for e, p in zip(self.instance, self.inst_prompts)],
                                 "class": [(e.path, p) for e, p in zip(self.class_ex, self.class_prompts)]})

    def draw(self, micro: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Latents and prompts of one micro-step: instance pictures, then as many class pictures (prior)."""
        cfg = self.cfg
        if self.bucket_of is None:
            idx = data.batch_indices(len(self.instance), cfg.train_batch_size, micro, cfg.seed)
        else:  # one bucket's pictures
            idx = bucketing.batch_indices(self.bucket_of, cfg.train_batch_size, micro, cfg.seed)
        lat, prompts = [self._latents(self.inst_src, idx, gen)], [self.inst_prompts[i] for i in idx]
        if self.prior:
            cidx = data.batch_indices(len(self.class_ex), cfg.train_batch_size, micro, cfg.seed + 1)
            csrc = self.class_src if self.bucket_of is None else self.class_src[self.bucket_of[idx[0]]]
            lat.append(self._latents(csrc, cidx, gen))
            prompts += [self.class_prompts[i] for i in cidx]
        return torch.cat(lat), prompts

    def _latents(self, src: torch.Tensor, idx: list[int], gen: torch.Generator) -> torch.Tensor:
        f = torch.randint(0, len(self.flips), (len(idx),), generator=gen)
        x = src[idx, f] if torch.is_tensor(src) else torch.stack([src[i][j] for i, j in zip(idx, f.tolist())])
        if self.cfg.cache_latents:
            return x.to(self.device)
        with torch.no_grad():
            vae = self.parts.vae
            return (vae.encode(x.to(self.device, self.weight_dtype)).latent_dist.sample().float()
                    * vae.config.scaling_factor)

    def embeddings(self, prompts: list[str], text_encoder, trains: bool) -> torch.Tensor:
        """The prompts' embeddings: cached ones, or the text encoder run now (with gradients when it trains)."""
        if self.cached_emb is not None:
            return torch.stack([self.cached_emb[p] for p in prompts]).to(self.device)
        ids = tokenize(self.parts, prompts).to(self.device)
        with torch.enable_grad() if trains else torch.no_grad():
            return text_encoder(ids)[0]


def tokenize(parts: SDParts, prompts: list[str]) -> torch.Tensor:
    tok = parts.tokenizer
    return tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
               return_tensors="pt").input_ids


def prepare(cfg: TrainConfig, parts: SDParts, method, accelerator, weight_dtype: torch.dtype) -> Batches:
    """Load the pictures (and make the class images, prior preservation), encode and cache what can be cached."""
    device = accelerator.device
    expand = (lambda s: s.replace(cfg.placeholder_token, " ".join(methods.ti_tokens(cfg)))) \
        if cfg.method == "textual_inversion" else (lambda s: s)
    instance = data.load_folder(cfg.instance_dir, cfg.resolution, "instance")
    inst_prompts = [expand(e.caption or cfg.instance_prompt) for e in instance]
    class_ex, class_prompts = [], []
    if cfg.with_prior_preservation:
        from nbkit.data.class_images import ensure_class_images

        with accelerator.main_process_first():  # one process generates, the others then find them cached
            ensure_class_images(parts, cfg.class_prompt, cfg.class_dir, cfg.num_class_images, cfg.resolution,
                                seed=cfg.seed, batch_size=cfg.class_batch_size, steps=cfg.sample_steps,
                                guidance=cfg.guidance_scale, scheduler=cfg.sample_scheduler,
                                device=device, dtype=weight_dtype)
        class_ex = data.load_folder(cfg.class_dir, cfg.resolution, "class")[: cfg.num_class_images]
        class_prompts = [cfg.class_prompt] * len(class_ex)
    flips = (False, True) if cfg.random_flip else (False,)
    crop_rng = np.random.default_rng(cfg.seed)

    def pixels(examples, size=cfg.resolution):  # [n, flips, 3, H, W]
        return torch.stack([torch.stack([data.to_tensor(e.image, size, cfg.center_crop, f, crop_rng)
                                         for f in flips]) for e in examples])

    bucket_of = sizes = None
    if cfg.bucketing:
        bucket_of, sizes, inst_src, class_src = _bucketed(cfg, parts, instance, class_ex, pixels, device, weight_dtype)
        if accelerator.is_main_process:
            print(bucketing.describe(bucket_of, sizes, cfg.train_batch_size))
    else:
        inst_src, class_src = pixels(instance), pixels(class_ex) if class_ex else None
    if cfg.cache_latents and not cfg.bucketing:
        inst_src = _encode(parts, inst_src, device, weight_dtype, cfg.seed)
        class_src = _encode(parts, class_src, device, weight_dtype, cfg.seed) if class_src is not None else None
    if cfg.cache_latents:
        parts.vae.to("cpu")  # not needed again until validation: frees its memory for training
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cached = None
    if not method.trains_text_encoder:
        with torch.no_grad():
            uniq = sorted(set(inst_prompts + class_prompts))
            cached = dict(zip(uniq, parts.text_encoder(tokenize(parts, uniq).to(device))[0].float().cpu()))
    return Batches(cfg, parts, device, weight_dtype, instance, inst_prompts, class_ex, class_prompts, inst_src,
                   class_src, cached, flips, bucket_of, sizes)


def _bucketed(cfg: TrainConfig, parts: SDParts, instance: list, class_ex: list, pixels, device, weight_dtype):
    """bucketing: each instance picture's bucket, the buckets, the pictures (latents with cache_latents) at their
    bucket's size (one [flips, 3, h, w] per picture), and the class pictures at each bucket's size that instance
    pictures are in ({bucket: [n, flips, 3, h, w]}, None without prior preservation)."""
    sizes = bucketing.bucket_list(cfg.buckets, cfg.resolution, bucketing.multiple_of(parts))
    bucket_of = bucketing.assign([e.image.size for e in instance], sizes)
    inst_src, class_src = [None] * len(instance), {}
    for b in sorted(set(bucket_of)):
        def encoded(px):  # a seed of each bucket's own: no two buckets start from the same latent noise
            return _encode(parts, px, device, weight_dtype, cfg.seed * 1_009 + b) if cfg.cache_latents else px

        members = [i for i, x in enumerate(bucket_of) if x == b]
        for i, src in zip(members, encoded(pixels([instance[i] for i in members], sizes[b]))):
            inst_src[i] = src
        if class_ex:
            class_src[b] = encoded(pixels(class_ex, sizes[b]))
    return bucket_of, sizes, inst_src, class_src or None


@torch.no_grad()
def _encode(parts: SDParts, px: torch.Tensor, device, weight_dtype, seed: int) -> torch.Tensor:
    """Latents of [n, flips, 3, H, W] pictures, 8 at a time on the device (the rest stay on the CPU)."""
    flat, gen = px.flatten(0, 1), torch.Generator().manual_seed(seed)
    lat = torch.cat([parts.vae.encode(flat[i:i + 8].to(device, weight_dtype)).latent_dist.sample(generator=gen)
                     .float().cpu() for i in range(0, len(flat), 8)])
    return (lat * parts.vae.config.scaling_factor).unflatten(0, px.shape[:2])
