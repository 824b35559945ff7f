"""What the planner knows about a model: its parameter counts and its activation calibration (`Arch`).

Counted on the `meta` device from the configs, so nothing is downloaded or allocated: SD 1.5 from data/sd15-arch
(nbkit.models.sd15), SDXL base 1.0 from data/sdxl-arch (nbkit.memory.sdxlarch), any local diffusers folder from
its own configs, or loaded parts directly. SDXL is recognised by its UNet's "text_time" conditioning, a second text
encoder, or a model id naming it (`sdxlarch.is_sdxl_id`: "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", ...).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.memory import actmodel, sdxlarch
from nbkit.memory.actmodel import calibration_for
from nbkit.training.optim import BNB_MIN_8BIT_SIZE

SD15_IDS = ("stable-diffusion-v1-5", "stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5",
            "CompVis/stable-diffusion")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD: the first only (text_encoder_2 counts 0)


@dataclass(frozen=True)
class Arch:
    """What the planner needs to know about a model: its parameter counts and its activation calibration."""

    name: str
    fingerprint: str
    unet: int
    text_encoder: int
    vae: int
    token_embedding: int  # elements of the text encoder's token-embedding matrix (TI trains it all)
    lora_per_rank_unet: int  # LoRA parameters per unit of rank on the UNet's attention projections
    lora_per_rank_te: int  # ... on the text encoder's attention projections
    largest: dict  # part -> elements of its largest parameter (the optimizer-in-backward's gradient peak)
    small: dict  # part -> elements in parameters under 4,096 elements (8-bit Adam keeps them in fp32)
    vae_factor: int  # image side / latent side
    calibration: dict = field(default_factory=dict, compare=False)
    calibration_source: str = "none"
    architecture: str = "sd"  # "sd" (1.x/2.x) or "sdxl"
    text_encoder_2: int = 0  # SDXL's second text encoder (OpenCLIP bigG, with its projection)
    lora_per_rank_te2: int = 0
    vae_fp32: bool = False  # the kit keeps the VAE in fp32 (its config says force_upcast: SDXL's)
    cross_attention_dim: int = 768  # width of the prompt embedding the UNet attends to
    pooled_dim: int = 0  # SDXL's pooled text embedding (text_embeds)

    @property
    def sdxl(self) -> bool:
        return self.architecture == "sdxl"

    def params(self, part: str) -> int:
        return getattr(self, part)

    def lora_per_rank(self, part: str) -> int:
        return {"unet": self.lora_per_rank_unet, "text_encoder": self.lora_per_rank_te,
                "text_encoder_2": self.lora_per_rank_te2}[part]


def _lora_per_rank(module, targets: list[str]) -> int:
    import torch

    n = 0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += m.in_features + m.out_features
    return n


def _config(module) -> dict:
    cfg = getattr(module, "config", None)
    return {} if cfg is None else (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def arch_from_parts(parts, name: str | None = None) -> Arch:
    """The Arch of loaded (or meta-built) parts: SDParts, SDXL's parts (a `text_encoder_2`), sdxlarch.Networks."""
    from nbkit.training.methods import LORA_TARGETS_TEXT, LORA_TARGETS_UNET

    def count(m):
        return sum(p.numel() for p in m.parameters()) if m is not None else 0

    def largest(m):
        return max((p.numel() for p in m.parameters()), default=0) if m is not None else 0

    def small(m):
        return sum(p.numel() for p in m.parameters() if p.numel() < BNB_MIN_8BIT_SIZE) if m is not None else 0

    unet_cfg = dict(parts.unet.config)
    te, te2 = parts.text_encoder, getattr(parts, "text_encoder_2", None)
    te2 = te2 if te2 is not None and hasattr(te2, "config") else None
    xl = te2 is not None or sdxlarch.is_sdxl_config(unet_cfg)
    fp = actmodel.fingerprint(unet_cfg, te.config.to_dict(), te2.config.to_dict() if te2 is not None else None)
    vae_cfg = _config(parts.vae) if parts.vae is not None else {}
    vae_blocks = vae_cfg.get("block_out_channels")
    cal, source = calibration_for(fp, count(parts.unet))
    pooled = (unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
              if sdxlarch.is_sdxl_config(unet_cfg) else 0)
    mods = {"unet": parts.unet, "text_encoder": te, "text_encoder_2": te2}
    return Arch(
        name=name or _guess_name(fp), fingerprint=fp, unet=count(parts.unet), text_encoder=count(te),
        vae=count(parts.vae) if vae_cfg else 0, token_embedding=te.get_input_embeddings().weight.numel(),
        lora_per_rank_unet=_lora_per_rank(parts.unet, LORA_TARGETS_UNET),
        lora_per_rank_te=_lora_per_rank(te, LORA_TARGETS_TEXT),
        largest={k: largest(m) for k, m in mods.items()}, small={k: small(m) for k, m in mods.items()},
        vae_factor=2 ** (len(vae_blocks) - 1) if vae_blocks else 8, calibration=cal, calibration_source=source,
        architecture="sdxl" if xl else "sd", text_encoder_2=count(te2),
        lora_per_rank_te2=_lora_per_rank(te2, LORA_TARGETS_TEXT) if te2 is not None else 0,
        vae_fp32=xl and bool(vae_cfg.get("force_upcast", False)),
        cross_attention_dim=unet_cfg.get("cross_attention_dim") or te.config.hidden_size, pooled_dim=pooled,
    )


@functools.lru_cache(maxsize=8)
def _arch_of_spec(spec: str) -> Arch:
    from nbkit.models.sd15 import build_parts

    if sdxlarch.is_sdxl_folder(spec):
        name = "sdxl" if Path(spec).resolve() == sdxlarch.SPEC.resolve() else None
        return arch_from_parts(sdxlarch.build("meta", spec=spec), name)
    name = "sd15" if Path(spec).resolve() == sd15_spec().resolve() else None
    return arch_from_parts(build_parts("meta", spec=spec), name)


def sd15_spec() -> Path:
    from nbkit.models.sd15 import SPEC

    return SPEC


def arch_of(model) -> Arch:
    """The Arch of `model`: loaded parts, "offline", "sd15" or an SD 1.x hub id, "sdxl" or an SDXL hub id, or a
    local diffusers folder. Parameters are counted on the meta device from the configs: nothing is downloaded or
    allocated (an SDXL hub id is planned as SDXL base 1.0: fine-tunes keep its architecture)."""
    from nbkit.models.parts import SDParts, resolve

    if isinstance(model, Arch):
        return model
    if isinstance(model, (SDParts, sdxlarch.Networks)) or hasattr(model, "unet"):
        return arch_from_parts(model)
    model = str(model)
    if model == "sd15" or any(s in model for s in SD15_IDS):
        return _arch_of_spec(str(sd15_spec()))
    path = Path(resolve(model))
    if (path / "unet" / "config.json").exists():
        return _arch_of_spec(str(path))
    if sdxlarch.is_sdxl_id(model):
        return _arch_of_spec(str(sdxlarch.SPEC))
    raise ValueError(f"Cannot plan for model {model!r}: give 'offline', 'sd15' (or an SD 1.x hub id), 'sdxl' (or an "
                     "SDXL hub id), a local diffusers folder, or loaded parts (nbkit.load_parts(...)).")


def _guess_name(fp: str) -> str:
    return actmodel.load_calibrations().get(fp, {}).get("name", f"model-{fp[:6]}")
