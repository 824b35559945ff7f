"""Stable Diffusion XL base 1.0's architecture without its weights: for the planner's counts and GPU benchmarks.

`data/sdxl-arch/` holds the configs of stabilityai/stable-diffusion-xl-base-1.0 as published with the model (UNet,
VAE, both text encoders, scheduler), and no weights. From them this module builds the real networks, on the
`meta` device (no memory at all) to count parameters, or with seeded random weights on a GPU to measure what
training costs: random weights take exactly the memory of the real ones. Its counts reproduce the published
model's (`PARAMS`): UNet 2.567 B, VAE 83.65 M, CLIP ViT-L/14 text 123.06 M, OpenCLIP bigG text + projection
694.66 M (tests/test_planner.py builds them and compares).

What differs from SD 1.5 for memory: a 3x bigger UNet (transformer depths 1 / 2 / 10 at the two lower levels,
no attention at the top, cross-attention on 2048-wide text states), a second text encoder 5.6x the first, 1024 px
pictures (128 x 128 latents: 4x SD 1.5's pixels per sample), and a VAE that overflows in fp16, so the kit keeps it
in fp32 (its config says force_upcast) while it encodes the training pictures once.

Training code lives in nbkit.models / nbkit.training; this module only builds shapes for the memory layer.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nbkit.paths import DATA_DIR

SPEC = DATA_DIR / "sdxl-arch"
# Parameter counts of the published SDXL base 1.0 weights (what the configs above must reproduce).
PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
SDXL_IDS = ("stable-diffusion-xl", "sdxl")  # a model id containing one of these is planned as SDXL base 1.0
RESOLUTION = 1024


@dataclass
class Networks:
    """SDXL's networks (no tokenizers: shapes are all the memory layer needs)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module | None
    source: str

    architecture = "sdxl"


def is_sdxl_config(unet_config: dict) -> bool:
    """SDXL's UNet is conditioned on the pooled text embedding and the picture sizes ("text_time")."""
    return dict(unet_config).get("addition_embed_type") == "text_time"


def is_sdxl_folder(path: str | Path) -> bool:
    """A diffusers folder of an SDXL model: a second text encoder, or a UNet conditioned on "text_time"."""
    path = Path(path)
    if (path / "text_encoder_2" / "config.json").exists():
        return True
    cfg = path / "unet" / "config.json"
    return cfg.exists() and is_sdxl_config(json.loads(cfg.read_text()))


def is_sdxl_id(model: str) -> bool:
    """A hub id or name of SDXL (base 1.0 and fine-tunes of it named so)."""
    m = str(model).lower()
    return any(s in m for s in SDXL_IDS) or m.endswith("-xl") or "/xl" in m


def configs(spec: str | Path = SPEC) -> dict[str, dict]:
    """The unet / vae / text_encoder / text_encoder_2 / scheduler configs of an SDXL diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = Path(spec)
    out = {"unet": dict(UNet2DConditionModel.load_config(spec / "unet")),
           "vae": dict(AutoencoderKL.load_config(spec / "vae"))}
    for name in ("text_encoder", "text_encoder_2"):
        out[name] = json.loads((spec / name / "config.json").read_text())
    sched = spec / "scheduler" / "scheduler_config.json"
    out["scheduler"] = json.loads(sched.read_text()) if sched.exists() else {}
    return out


def _text_config(cfg: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "_class_name")})


def build(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32, spec: str | Path = SPEC,
          with_vae: bool = True, seed: int = 0, dtypes: dict[str, torch.dtype] | None = None,
          text_encoder_2: bool = True) -> Networks:
    """SDXL's networks with seeded random weights, created directly on `device` ("meta": shapes only), each in
    `dtype` (or `dtypes[name]`), never cast afterwards. text_encoder_2=False: an empty module in its place (a step
    on cached prompt embeddings never runs it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from nbkit.models.sd15 import _default_dtype

    cfg = configs(spec)
    dtypes = {"unet": dtype, "text_encoder": dtype, "text_encoder_2": dtype, "vae": dtype, **(dtypes or {})}
    torch.manual_seed(seed)
    made: dict[str, torch.nn.Module | None] = {"vae": None}
    with torch.device(device) if str(device) != "cpu" else contextlib.nullcontext():
        with _default_dtype(dtypes["unet"]):
            made["unet"] = UNet2DConditionModel.from_config(cfg["unet"])
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            with _default_dtype(dtypes[name]):
                keep = name == "text_encoder" or text_encoder_2
                made[name] = cls(_text_config(cfg[name])) if keep else torch.nn.Module()
        if with_vae:
            with _default_dtype(dtypes["vae"]):
                made["vae"] = AutoencoderKL.from_config(cfg["vae"])
    return Networks(made["unet"], made["text_encoder"], made["text_encoder_2"], made["vae"],
                    f"sdxl-architecture (random weights, {device})")


def added_conditions(unet_config: dict, batch: int, dtype: torch.dtype = torch.float32) -> dict:
    """The UNet's `added_cond_kwargs` for a batch: the pooled text embedding (text_embeds: [batch, 1280] for
    SDXL) and the six size numbers (time_ids), each embedded in addition_time_embed_dim (256) dimensions."""
    cfg = dict(unet_config)
    if not is_sdxl_config(cfg):
        return {}
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled, dtype=dtype),
                                  "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch,
                                                           dtype=dtype)}}
