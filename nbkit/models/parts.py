"""Load Stable Diffusion's parts (from a hub id, a local folder, or the offline default) and put them together.

Always the real `from_pretrained` code of diffusers and transformers: the offline model is just a local folder.
SD 1.x/2.x come as SDParts, SDXL as nbkit.models.sdxl.SDXLParts: the model's architecture lives in its parts'
class (nbkit.models.base), behind one interface the rest of the kit calls.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nbkit.env import runtime
from nbkit.models.base import PromptEmbeds, SDParts  # noqa: F401 - importable from here too


class ModelNotFound(OSError):
    """The model could not be loaded; the message says why and what to use instead."""


def resolve(model: str) -> str:
    """'offline' -> the offline model's folder; 'tiny-sdxl' -> the kit's tiny SDXL; anything else unchanged."""
    if model in ("offline", "", None):
        from nbkit.models.offline import offline_model_dir

        return str(offline_model_dir())
    if model == "tiny-sdxl":
        from nbkit.models.sdxl import TINY_SDXL

        return str(TINY_SDXL)
    return model


def load_parts(model: str = "offline", revision: str | None = None, variant: str | None = None,
               vae: str | None = None, half: tuple[str, ...] = (), dtype: torch.dtype = torch.float16) -> SDParts:
    """Load tokenizer(s), text encoder(s), VAE, UNet and a DDPM training scheduler from `model`: SD 1.x/2.x as
    SDParts, SDXL (a UNet conditioned on "text_time") as nbkit.models.sdxl.SDXLParts.

    `vae`: another VAE instead of the model's (a hub id or folder), e.g. "madebyollin/sdxl-vae-fp16-fix", SDXL's VAE
    retrained to run in fp16 (nbkit.models.sdxl).
    `half`: the networks ("unet", "text_encoder", "text_encoder_2") to load in `dtype` instead of fp32, frozen
    ones a GPU run keeps in half precision anyway (nbkit.training.methods.frozen_networks): half the host memory.
    """
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
        parts = _load(source, variant, kw, {n: dtype for n in half})
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
    if vae:
        parts.vae = _other_vae(vae, offline)
    return parts


def _load(source: str, variant: str | None, kw: dict, dtypes: dict | None = None) -> SDParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    dt = {n: {"torch_dtype": d} for n, d in (dtypes or {}).items()}  # fp32 unless asked (diffusers' default)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, **kw,
                                                 **dt.get("text_encoder", {}))
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, **kw)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, **kw, **dt.get("unet", {}))
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
    if unet.config.get("addition_embed_type") == "text_time":  # SDXL: a second tokenizer and text encoder
        from nbkit.models.sdxl import SDXLParts, load_second_encoder

        return SDXLParts(tokenizer, text_encoder, vae, unet, noise_scheduler, source,
                         *load_second_encoder(source, variant, kw, dt.get("text_encoder_2")))
    return SDParts(tokenizer, text_encoder, vae, unet, noise_scheduler, source)


def _other_vae(vae: str, offline: bool):
    from diffusers import AutoencoderKL

    try:
        if Path(vae).is_dir():
            return AutoencoderKL.from_pretrained(vae, subfolder="vae" if (Path(vae) / "vae").is_dir() else None)
        return AutoencoderKL.from_pretrained(vae, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"Could not load the VAE {vae!r} ({str(err).splitlines()[0]}). Give a hub id of a VAE (e.g. "
            "'madebyollin/sdxl-vae-fp16-fix', SDXL's VAE fixed for fp16) or a folder holding its config.json and "
            "weights; or leave vae empty to use the model's own."
        ) from err


def pipeline(parts: SDParts, scheduler: str = "ddim", dtype: torch.dtype | None = None, device: str | None = "auto"):
    """The model's pipeline over `parts` (shared, not copied) with the named sampling scheduler:
    StableDiffusionPipeline, or StableDiffusionXLPipeline for SDXL.

    device="auto" puts it on this machine's CUDA GPU when there is one (the shared parts move with it), so a
    freshly loaded model never samples on the CPU of a Colab GPU runtime by mistake; None leaves it where it is.
    """
    from nbkit.models.schedulers import make_scheduler

    pipe = parts.make_pipeline(make_scheduler(scheduler, parts.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device is not None:
        pipe.to(device)
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe
