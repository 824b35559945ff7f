"""Stable Diffusion XL's parts: what makes SDXL differ from SD 1.x lives here, behind the interface of
nbkit.models.base.SDParts, so the training loop, batches, methods and exports never branch on the model.

- **Two tokenizers and text encoders** (CLIPTextModel, CLIPTextModelWithProjection): the UNet attends to both
  encoders' penultimate hidden states side by side, and is also conditioned on the second's projected pooled
  output (`text_embeds`) - as StableDiffusionXLPipeline.encode_prompt and diffusers' train_dreambooth_lora_sdxl.py
  compute them.
- **The size conditioning** (`time_ids`): each picture's original height and width, the top-left corner of its crop,
  and the target size, as that script computes them; the batches measure them from the training pictures
  (nbkit.data.images.to_tensor_sized), `unet_kwargs` hands them to the UNet.
- **1024 px** (`SDXL_RESOLUTION`; the kit's tiny SDXL: 64).
- **The VAE and fp16.** SDXL's VAE overflows in fp16: NaN latents, black pictures. Decided: wherever the VAE's
  config says `force_upcast` (SDXL's does), the kit keeps it in fp32 - while it encodes the training pictures
  once (the latents are cached, then it leaves the GPU) and while it decodes samples, also inside the fp16 autocast
  of validation during training (`keep_vae_fp32`). It always works, needs no download, and costs ~0.3 GB of GPU
  memory for the minutes the VAE is there. The other way, `TrainConfig(vae=FP16_FIX_VAE)` (load_parts(vae=...)),
  swaps in madebyollin's SDXL VAE retrained to stay finite in fp16 (its config says force_upcast false): it then
  runs in fp16 like SD 1.5's. The NaN guards name this cause on SDXL (`nan_causes`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from nbkit.models.base import PromptEmbeds, SDParts
from nbkit.paths import DATA_DIR

SDXL_RESOLUTION = 1024  # SDXL's image side
TINY_SDXL = DATA_DIR / "tiny-sdxl"  # the kit's tiny SDXL: SDXL's classes, seeded random weights (nbkit.toy.tiny_sdxl)
TINY_SDXL_RESOLUTION = 64
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"  # SDXL's VAE retrained to run in fp16 (same latents, ~same pictures)


@dataclass
class SDXLParts(SDParts):
    """SDXL's networks: SDParts' plus the second tokenizer and text encoder."""

    tokenizer_2: object = None  # CLIPTokenizer
    text_encoder_2: torch.nn.Module = None  # CLIPTextModelWithProjection

    architecture: ClassVar[str] = "sdxl"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")

    def encode_prompt(self, prompts: list[str], device, encoders: dict | None = None) -> PromptEmbeds:
        """Both encoders' penultimate hidden states, concatenated; the second's projected pooled output."""
        encoders = {**self.text_encoders, **(encoders or {})}
        hidden = []
        for tok, name in ((self.tokenizer, "text_encoder"), (self.tokenizer_2, "text_encoder_2")):
            out = encoders[name](self.tokenize(prompts, tok).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return PromptEmbeds(torch.cat(hidden, dim=-1), out[0])  # out[0]: text_embeds of CLIPTextModelWithProjection

    def unet_kwargs(self, embeds: PromptEmbeds, sizes: torch.Tensor, dtype: torch.dtype) -> dict:
        """SDXL's added conditions: the pooled prompt embedding and the time_ids (sizes: [batch, 6])."""
        pooled = embeds.pooled.to(dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes.to(pooled.device, dtype)}}

    def frozen_dtype(self, name: str, weight_dtype: torch.dtype) -> torch.dtype:
        """The VAE stays fp32 where its config asks (force_upcast: SDXL's overflows in fp16); the rest as SD's."""
        return torch.float32 if name == "vae" and vae_needs_fp32(self.vae) else weight_dtype

    def nan_causes(self, precision: str) -> list[str]:
        dtype = next(self.vae.parameters()).dtype
        where = ("this run's VAE is in fp32 (its config says force_upcast)" if dtype == torch.float32 else
                 f"this run's VAE is in {str(dtype).removeprefix('torch.')} and its config says force_upcast=false")
        return [f"SDXL's VAE overflows in fp16 (NaN latents, black pictures) - {where}; use the model's own VAE (kept "
                f"in fp32) or, for fp16, one made for it: TrainConfig(vae={FP16_FIX_VAE!r})"]

    def make_pipeline(self, scheduler):
        from diffusers import StableDiffusionXLPipeline

        if vae_needs_fp32(self.vae):
            keep_vae_fp32(self.vae)
        self.vae.enable_slicing()  # one 1024 px picture decoded at a time: 4 at once in fp32 would need ~10 GiB
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=scheduler, add_watermarker=False)


def load_second_encoder(source: str, variant: str | None, kw: dict, dtype: dict | None = None
                        ) -> tuple[object, torch.nn.Module]:
    """SDXL's tokenizer_2 and text_encoder_2 from a diffusers folder or hub id (the same from_pretrained code)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kw)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", variant=variant,
                                                                 **kw, **(dtype or {}))
    return tokenizer_2, text_encoder_2


def vae_needs_fp32(vae) -> bool:
    """The VAE's own config says it overflows in half precision (SDXL's: force_upcast; the fp16-fix VAE's: not)."""
    return bool(getattr(vae.config, "force_upcast", False))


def keep_vae_fp32(vae) -> None:
    """Make `vae.encode` / `vae.decode` run in the VAE's own precision (fp32) even inside an fp16 autocast, their
    input cast to it: under autocast the convolutions would otherwise run in fp16 and overflow. Idempotent; the
    VAE's weights, state dict and saved files are untouched (copies of the VAE keep it, pointing at themselves)."""
    for name in ("encode", "decode"):
        if not isinstance(vae.__dict__.get(name), functools.partial):
            setattr(vae, name, functools.partial(_without_autocast, vae, name))


def _without_autocast(vae, name: str, x: torch.Tensor, *args, **kwargs):
    with torch.autocast(x.device.type, enabled=False):
        return getattr(type(vae), name)(vae, x.to(vae.dtype), *args, **kwargs)
