"""Load Stable Diffusion's parts (from a hub id, a local folder, or the offline default) and put them together.

Always the real `from_pretrained` code of diffusers and transformers: the offline model is just a local folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nbkit.env import runtime


class ModelNotFound(OSError):
    """The model could not be loaded; the message says why and what to use instead."""


@dataclass
class SDParts:
    """The four networks of Stable Diffusion, the tokenizer and the training noise scheduler."""

    tokenizer: object  # CLIPTokenizer
    text_encoder: torch.nn.Module  # CLIPTextModel
    vae: torch.nn.Module  # AutoencoderKL
    unet: torch.nn.Module  # UNet2DConditionModel
    noise_scheduler: object  # DDPMScheduler with the model's training schedule
    source: str  # the folder or hub id it came from

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


def resolve(model: str) -> str:
    """'offline' -> the offline model's folder; anything else unchanged."""
    if model in ("offline", "", None):
        from nbkit.models.offline import offline_model_dir

        return str(offline_model_dir())
    return model


def load_parts(model: str = "offline", revision: str | None = None, variant: str | None = None) -> SDParts:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM training scheduler from `model`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve(model)
    local = Path(source).is_dir()
    if not local and (Path(source).exists() or source.startswith((".", "/", "~"))):
        raise ModelNotFound(f"{source!r} is not a diffusers model folder (it should hold model_index.json, unet/, "
                            "vae/, ...).")
    kw = dict(revision=revision) if not local else {}
    offline = not local and not runtime.hub_reachable()  # no network: only the local cache can help (at once)
    if offline:
        kw["local_files_only"] = True
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    except (OSError, ValueError) as err:  # hub errors are OSError subclasses; missing subfolders ValueError/OSError
        if local:
            why = "the folder is not a complete diffusers model (model_index.json, unet/, vae/, text_encoder/, ...)"
        elif offline:
            why = (f"no network: the model hub cannot be reached (no connection, or HF_HUB_OFFLINE is set) and "
                   f"{model!r} is not in the local cache")
        else:
            why = (f"no such model: the hub has no {model!r}, or it is gated/private (check the spelling; for a gated "
                   "model accept its licence on huggingface.co and log in with `huggingface-cli login`)")
        raise ModelNotFound(
            f"Could not load the model {model!r}: {why}.\n({str(err).splitlines()[0]})\n"
            "Use MODEL='offline' (the kit's bundled model, no network needed) or 'auto' (SD 1.5 when a GPU and the "
            "hub are there, the offline model otherwise), or point MODEL at a local diffusers folder."
        ) from err
    return SDParts(tokenizer, text_encoder, vae, unet, noise_scheduler, source)


def pipeline(parts: SDParts, scheduler: str = "ddim", dtype: torch.dtype | None = None, device: str | None = "auto"):
    """A StableDiffusionPipeline over `parts` (shared, not copied) with the named sampling scheduler.

    device="auto" puts it on this machine's CUDA GPU when there is one (the shared parts move with it), so a
    freshly loaded model never samples on the CPU of a Colab GPU runtime by mistake; None leaves it where it is.
    """
    from diffusers import StableDiffusionPipeline

    from nbkit.models.schedulers import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=make_scheduler(scheduler, parts.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device is not None:
        pipe.to(device)
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe
