"""The training pictures and prompts as the steps see them: loaded and checked once, latents encoded once (the VAE
then leaves the GPU), prompt embeddings computed once when the text encoders are frozen, and one batch per
(seed, micro-step), so a step is a pure function of its number and a resumed run draws what the first would have.
With bucketing (nbkit.data.buckets) each picture is cached at its aspect-ratio bucket's size and a batch comes from
one bucket.

The prompts are encoded by the model's parts (`parts.encode_prompt`: one text encoder, or SDXL's two and a pooled
embedding), and each picture's sizes (original, crop corner, target: SDXL's time_ids) go with its latents; the
UNet takes what its model needs of them (`parts.unet_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbkit.config import TrainConfig
from nbkit.data import buckets as bucketing
from nbkit.data import concepts
from nbkit.data import images as data
from nbkit.models.parts import PromptEmbeds, SDParts
from nbkit.training import guards, methods


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
    cached_emb: dict[str, PromptEmbeds] | None  # prompt -> its embeddings, when the text encoders are frozen
    flips: tuple[bool, ...]
    inst_sizes: torch.Tensor | list | None = None  # [n, flips, 6]: (original h, w, crop top, left, target h, w)
    class_sizes: torch.Tensor | dict | None = None  # bucketing: one per picture / {bucket: [n, flips, 6]}, as above
    bucket_of: list[int] | None = None  # bucketing: each instance picture's bucket, an index into `buckets`
    buckets: list[tuple[int, int]] | None = None  # bucketing: the (height, width) of each bucket
    groups: list | None = None  # concepts.Group per concept (None: one, every picture)

    @property
    def prior(self) -> bool:
        return self.class_src is not None

    def fingerprint(self) -> dict:
        """What the checkpoints check a resumed run against: the same pictures with the same prompts."""
        from nbkit.training.checkpoint import data_fingerprint

        return {**data_fingerprint({"instance": [(e.path, p) for e, p in zip(self.instance, self.inst_prompts)],
                                    "class": [(e.path, p) for e, p in zip(self.class_ex, self.class_prompts)]}),
                **concepts.fingerprint(self.groups or [])}

    def draw(self, micro: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Latents, prompts and sizes ([batch, 6]) of one micro-step: instance pictures, then as many class pictures
        (prior); with several concepts, all of one concept's (nbkit.data.concepts.pick), in turn."""
        cfg = self.cfg
        if self.bucket_of is not None:  # one bucket's pictures (one concept: validate refuses both at once)
            idx = bucketing.batch_indices(self.bucket_of, cfg.train_batch_size, micro, cfg.seed)
            cidx = (data.batch_indices(len(self.class_ex), cfg.train_batch_size, micro, cfg.seed + 1)
                    if self.prior else [])
        else:
            g, m = concepts.pick(self.groups or [concepts.Group(list(range(len(self.instance))),
                                                                list(range(len(self.class_ex))))], micro, cfg.seed)
            idx = [g.instance[i] for i in data.batch_indices(len(g.instance), cfg.train_batch_size, m, cfg.seed)]
            cidx = [g.classes[i] for i in data.batch_indices(len(g.classes), cfg.train_batch_size, m, cfg.seed + 1)
                    ] if self.prior else []
        lat, size = self._latents(self.inst_src, self.inst_sizes, idx, gen)
        lat, size, prompts = [lat], [size], [self.inst_prompts[i] for i in idx]
        if self.prior:
            csrc, csizes = self.class_src, self.class_sizes
            if self.bucket_of is not None:  # the class pictures cropped to this batch's bucket
                csrc, csizes = csrc[self.bucket_of[idx[0]]], csizes[self.bucket_of[idx[0]]]
            for out, x in zip((lat, size), self._latents(csrc, csizes, cidx, gen)):
                out.append(x)
            prompts += [self.class_prompts[i] for i in cidx]
        return torch.cat(lat), prompts, torch.cat(size).to(self.device)

    def _latents(self, src: torch.Tensor, sizes: torch.Tensor, idx: list[int],
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.randint(0, len(self.flips), (len(idx),), generator=gen)
        x, sz = ((src[idx, f], sizes[idx, f]) if torch.is_tensor(src) else  # bucketing: one tensor per picture
                 (torch.stack([src[i][j] for i, j in zip(idx, f.tolist())]),
                  torch.stack([sizes[i][j] for i, j in zip(idx, f.tolist())])))
        if self.cfg.cache_latents:
            return x.to(self.device), sz
        with torch.no_grad():
            vae = self.parts.vae
            return (vae.encode(x.to(self.device, vae.dtype)).latent_dist.sample().float()
                    * vae.config.scaling_factor), sz

    def embeddings(self, prompts: list[str], text_encoders: dict, trains: bool) -> PromptEmbeds:
        """The prompts' embeddings: cached ones, or the text encoders (by name, as accelerate wrapped them) run now,
        with gradients when they train."""
        if self.cached_emb is not None:
            return PromptEmbeds.stack([self.cached_emb[p] for p in prompts]).to(self.device)
        with torch.enable_grad() if trains else torch.no_grad():
            return self.parts.encode_prompt(prompts, self.device, text_encoders)


def prepare(cfg: TrainConfig, parts: SDParts, method, accelerator, weight_dtype: torch.dtype) -> Batches:
    """Load the pictures (and make the class images, prior preservation), encode and cache what can be cached."""
    device = accelerator.device
    expand = (lambda s: s.replace(cfg.placeholder_token, " ".join(methods.ti_tokens(cfg)))) \
        if cfg.method == "textual_inversion" else (lambda s: s)
    # every subject's pictures and prompts, and its class images (made by one process, the others find them)
    got = concepts.load(cfg, parts, accelerator.main_process_first, device, weight_dtype, expand)
    instance, inst_prompts, class_ex, class_prompts = got.instance, got.inst_prompts, got.class_ex, got.class_prompts
    flips = (False, True) if cfg.random_flip else (False,)
    crop_rng = np.random.default_rng(cfg.seed)

    def pixels(examples, size=cfg.resolution):  # [n, flips, 3, H, W] and the sizes [n, flips, 6]
        done = [[data.to_tensor_sized(e.image, size, cfg.center_crop, f, crop_rng) for f in flips] for e in examples]
        return (torch.stack([torch.stack([px for px, _ in row]) for row in done]),
                torch.tensor([[size for _, size in row] for row in done], dtype=torch.float32))

    bucket_of = sizes = None
    if cfg.bucketing:
        bucket_of, sizes, (inst_src, inst_sizes), (class_src, class_sizes) = _bucketed(cfg, parts, instance, class_ex,
                                                                                       pixels, device)
        if accelerator.is_main_process:
            print(bucketing.describe(bucket_of, sizes, cfg.train_batch_size))
    else:
        (inst_src, inst_sizes), (class_src, class_sizes) = pixels(instance), pixels(class_ex) if class_ex else (None,
                                                                                                                None)
    if cfg.cache_latents and not cfg.bucketing:
        inst_src = _encode(parts, inst_src, device, cfg.seed)
        class_src = _encode(parts, class_src, device, cfg.seed) if class_src is not None else None
    if cfg.cache_latents:
        parts.vae.to("cpu")  # not needed again until validation: frees its memory for training
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cached = None
    if not method.trains_text_encoder:
        with torch.no_grad():
            uniq = sorted(set(inst_prompts + class_prompts))
            cached = dict(zip(uniq, parts.encode_prompt(uniq, device).to(torch.float32).to("cpu").rows()))
    return Batches(cfg, parts, device, weight_dtype, instance, inst_prompts, class_ex, class_prompts, inst_src,
                   class_src, cached, flips, inst_sizes, class_sizes, bucket_of, sizes, got.groups)


def _bucketed(cfg: TrainConfig, parts: SDParts, instance: list, class_ex: list, pixels, device):
    """bucketing: each instance picture's bucket, the buckets, the pictures (latents with cache_latents) at their
    bucket's size with their sizes (one [flips, 3, h, w] and [flips, 6] per picture), and the class pictures at the
    size of each bucket that instance pictures are in ({bucket: ...} twice; None without prior preservation)."""
    sizes = bucketing.bucket_list(cfg.buckets, cfg.resolution, bucketing.multiple_of(parts))
    bucket_of = bucketing.assign([e.image.size for e in instance], sizes)
    inst_src, inst_sizes, class_src, class_sizes = [None] * len(instance), [None] * len(instance), {}, {}
    for b in sorted(set(bucket_of)):
        def encoded(px):  # a seed of each bucket's own: no two buckets start from the same latent noise
            return _encode(parts, px, device, cfg.seed * 1_009 + b) if cfg.cache_latents else px

        members = [i for i, x in enumerate(bucket_of) if x == b]
        px, sz = pixels([instance[i] for i in members], sizes[b])
        for i, src, size in zip(members, encoded(px), sz):
            inst_src[i], inst_sizes[i] = src, size
        if class_ex:
            px, sz = pixels(class_ex, sizes[b])
            class_src[b], class_sizes[b] = encoded(px), sz
    return bucket_of, sizes, (inst_src, inst_sizes), (class_src or None, class_sizes or None)


def encode_chunk(pixels: int, fp32: bool) -> int:
    """Pictures the VAE encodes at once while caching latents: 8 of 512 x 512 px in half precision, half as many in
    fp32 (SDXL's VAE): 1 at 1024 px, where two fp32 encodes at once would cost ~5 GiB, a T4's peak of the run."""
    return max(1, min(8, (4 if fp32 else 8) * 512 ** 2 // pixels))


@torch.no_grad()
def _encode(parts: SDParts, px: torch.Tensor, device, seed: int) -> torch.Tensor:
    """Latents of [n, flips, 3, H, W] pictures, in the VAE's own precision (SDXL's: fp32), a few at a time on the
    device (encode_chunk; the rest stay on the CPU); non-finite latents stop the run, naming the cause."""
    flat, gen, vae = px.flatten(0, 1), torch.Generator().manual_seed(seed), parts.vae
    n = encode_chunk(px.shape[-2] * px.shape[-1], vae.dtype == torch.float32)
    lat = torch.cat([vae.encode(flat[i:i + n].to(device, vae.dtype)).latent_dist.sample(generator=gen)
                     .float().cpu() for i in range(0, len(flat), n)])
    if not torch.isfinite(lat).all():
        raise guards.non_finite_latents(parts, str(vae.dtype).removeprefix("torch."))
    return (lat * vae.config.scaling_factor).unflatten(0, px.shape[:2])
