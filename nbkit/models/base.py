"""A model's parts and the one interface the training loop, batches, methods and exports call, so that none of
them branches on the architecture: `SDParts` is Stable Diffusion 1.x/2.x; nbkit.models.sdxl.SDXLParts is SDXL.

- `text_encoders` (name -> module) and `networks` (every network by name);
- `encode_prompt(prompts, device, encoders=None)` -> `PromptEmbeds` (hidden states; SDXL: and the pooled one);
- `unet_kwargs(embeds, sizes, dtype)`: the UNet's inputs beyond (latents, timesteps, hidden states);
- `frozen_dtype(name, dtype)`, `nan_causes(precision)`, `make_pipeline(scheduler)`, `default_resolution`.

nbkit.models.parts loads them (and re-exports both classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch


@dataclass
class PromptEmbeds:
    """What the text encoders make of a batch of prompts: the UNet's cross-attention input, and (SDXL) the pooled
    embedding it is also conditioned on."""

    hidden: torch.Tensor  # [batch, tokens, dim]: encoder_hidden_states
    pooled: torch.Tensor | None = None  # [batch, dim]: SDXL's text_embeds (None for SD 1.x/2.x)

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return PromptEmbeds(self.hidden.to(*args, **kwargs),
                            None if self.pooled is None else self.pooled.to(*args, **kwargs))

    def rows(self) -> list[PromptEmbeds]:
        """One PromptEmbeds per prompt (what a cache holds)."""
        return [PromptEmbeds(h, None if self.pooled is None else self.pooled[i]) for i, h in enumerate(self.hidden)]

    @staticmethod
    def stack(rows: list[PromptEmbeds]) -> PromptEmbeds:
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return PromptEmbeds(torch.stack([r.hidden for r in rows]), pooled)


@dataclass
class SDParts:
    """The four networks of Stable Diffusion, the tokenizer and the training noise scheduler."""

    tokenizer: object  # CLIPTokenizer
    text_encoder: torch.nn.Module  # CLIPTextModel
    vae: torch.nn.Module  # AutoencoderKL
    unet: torch.nn.Module  # UNet2DConditionModel
    noise_scheduler: object  # DDPMScheduler with the model's training schedule
    source: str  # the folder or hub id it came from

    architecture: ClassVar[str] = "sd"  # "sd" (1.x/2.x) or "sdxl"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)

    @property
    def prediction_type(self) -> str:
        """'epsilon' (SD 1.x, SD 2 base) or 'v_prediction' (SD 2.x 768)."""
        return self.noise_scheduler.config.prediction_type

    @property
    def pretraining(self) -> dict:
        """How the model was pretrained, where it says so (the kit's toy model: pretrain_config.json); else {}."""
        import json

        f = Path(self.source) / "pretrain_config.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        """The image side the model was made for (SD 1.5: 512; SD 2: 768; SDXL: 1024; the offline models: 64)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """Every text encoder by its pipeline name ("text_encoder", SDXL's "text_encoder_2" too)."""
        return {n: getattr(self, n) for n in self.text_encoder_names}

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        """Every network by its pipeline name: the UNet, the text encoders, the VAE."""
        return {"unet": self.unet, **self.text_encoders, "vae": self.vae}

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tok = tokenizer or self.tokenizer
        return tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids

    def encode_prompt(self, prompts: list[str], device, encoders: dict | None = None) -> PromptEmbeds:
        """The prompts through the text encoder (`encoders`: the same by name, e.g. as accelerate wrapped them),
        as the pipeline encodes them; gradients flow where the caller enables them."""
        te = (encoders or {}).get("text_encoder", self.text_encoder)
        return PromptEmbeds(te(self.tokenize(prompts).to(device))[0])

    def unet_kwargs(self, embeds: PromptEmbeds, sizes: torch.Tensor, dtype: torch.dtype) -> dict:
        """The UNet's inputs beyond (noisy latents, timesteps, hidden states); `sizes` [batch, 6]: each picture's
        (original height, width, crop top, left, target height, width). SD 1.x/2.x take none."""
        return {}

    def frozen_dtype(self, name: str, weight_dtype: torch.dtype) -> torch.dtype:
        """The precision a frozen network is kept in during training (SD: the run's half precision for all)."""
        return weight_dtype

    def nan_causes(self, precision: str) -> list[str]:
        """Causes of a non-finite loss or latent that belong to this model (the guards add the general ones)."""
        return []

    def make_pipeline(self, scheduler):
        """The model's diffusers pipeline over these parts (shared, not copied) with a sampling scheduler."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
