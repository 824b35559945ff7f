"""The training pictures and prompts as the steps see them: loaded and checked once, latents encoded once (the VAE
then leaves the GPU), prompt embeddings computed once when the text encoder is frozen, and one batch per
(seed, micro-step), so a step is a pure function of its number and a resumed run draws what the first would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbkit.config import TrainConfig
from nbkit.data import concepts
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
    inst_src: torch.Tensor  # [n, flips, ...]: latents (cache_latents) or pixels
    class_src: torch.Tensor | None
    cached_emb: dict[str, torch.Tensor] | None  # prompt -> embedding, when the text encoder is frozen
    flips: tuple[bool, ...]
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

    def draw(self, micro: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Latents and prompts of one micro-step: instance pictures, then as many class pictures (prior); with
        several concepts, all of one concept's (nbkit.data.concepts.pick), in turn."""
        cfg = self.cfg
        g, m = concepts.pick(self.groups or [concepts.Group(list(range(len(self.instance))),
                                                            list(range(len(self.class_ex))))], micro, cfg.seed)
        idx = [g.instance[i] for i in data.batch_indices(len(g.instance), cfg.train_batch_size, m, cfg.seed)]
        lat, prompts = [self._latents(self.inst_src, idx, gen)], [self.inst_prompts[i] for i in idx]
        if self.prior:
            cidx = [g.classes[i] for i in data.batch_indices(len(g.classes), cfg.train_batch_size, m, cfg.seed + 1)]
            lat.append(self._latents(self.class_src, cidx, gen))
            prompts += [self.class_prompts[i] for i in cidx]
        return torch.cat(lat), prompts

    def _latents(self, src: torch.Tensor, idx: list[int], gen: torch.Generator) -> torch.Tensor:
        f = torch.randint(0, len(self.flips), (len(idx),), generator=gen)
        x = src[idx, f]
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
    # every subject's pictures and prompts, and its class images (made by one process, the others find them)
    got = concepts.load(cfg, parts, accelerator.main_process_first, device, weight_dtype, expand)
    instance, inst_prompts, class_ex, class_prompts = got.instance, got.inst_prompts, got.class_ex, got.class_prompts
    flips = (False, True) if cfg.random_flip else (False,)
    crop_rng = np.random.default_rng(cfg.seed)

    def pixels(examples):  # [n, flips, 3, H, W]
        return torch.stack([torch.stack([data.to_tensor(e.image, cfg.resolution, cfg.center_crop, f, crop_rng)
                                         for f in flips]) for e in examples])

    inst_src, class_src = pixels(instance), pixels(class_ex) if class_ex else None
    if cfg.cache_latents:
        inst_src = _encode(parts, inst_src, device, weight_dtype, cfg.seed)
        class_src = _encode(parts, class_src, device, weight_dtype, cfg.seed) if class_src is not None else None
        parts.vae.to("cpu")  # not needed again until validation: frees its memory for training
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cached = None
    if not method.trains_text_encoder:
        with torch.no_grad():
            uniq = sorted(set(inst_prompts + class_prompts))
            cached = dict(zip(uniq, parts.text_encoder(tokenize(parts, uniq).to(device))[0].float().cpu()))
    return Batches(cfg, parts, device, weight_dtype, instance, inst_prompts, class_ex, class_prompts, inst_src,
                   class_src, cached, flips, got.groups)


@torch.no_grad()
def _encode(parts: SDParts, px: torch.Tensor, device, weight_dtype, seed: int) -> torch.Tensor:
    """Latents of [n, flips, 3, H, W] pictures, 8 at a time on the device (the rest stay on the CPU)."""
    flat, gen = px.flatten(0, 1), torch.Generator().manual_seed(seed)
    lat = torch.cat([parts.vae.encode(flat[i:i + 8].to(device, weight_dtype)).latent_dist.sample(generator=gen)
                     .float().cpu() for i in range(0, len(flat), 8)])
    return (lat * parts.vae.config.scaling_factor).unflatten(0, px.shape[:2])
