"""Stable Diffusion 1.5's architecture without its weights: for counting parameters and for GPU benchmarks.

`data/sd15-arch/` holds the configs of SD 1.5's UNet, VAE and text encoder (as published with the model) and
its training noise schedule. From them this module builds the real networks with random weights, on any
device, without a download: on the `meta` device (no memory at all) to count parameters, or on a GPU to
measure what training costs in memory and time. Random weights train exactly as slowly and as hungrily as the
real ones; only the pictures differ.

The tokenizer is the offline model's, padded to CLIP's 49,408 entries so that the embedding matrix (which
textual inversion resizes and trains) has SD 1.5's true size.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from nbkit.models.offline import OFFLINE_SPEC
from nbkit.models.parts import SDParts
from nbkit.paths import DATA_DIR

SPEC = DATA_DIR / "sd15-arch"
# Parameter counts of the published SD 1.5 weights (what the configs above must reproduce).
PARAMS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


def configs(spec: str | Path = SPEC) -> dict[str, dict]:
    """The unet / vae / text_encoder / scheduler configs of a diffusers folder (weights not needed)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = Path(spec)
    te = json.loads((spec / "text_encoder" / "config.json").read_text())
    sched = json.loads((spec / "scheduler" / "scheduler_config.json").read_text())
    return {"unet": dict(UNet2DConditionModel.load_config(spec / "unet")),
            "vae": dict(AutoencoderKL.load_config(spec / "vae")), "text_encoder": te, "scheduler": sched}


def tokenizer(vocab_size: int = 49_408):
    """The offline model's CLIP tokenizer with unused entries appended up to `vocab_size`."""
    import json

    from transformers import CLIPTokenizer

    tok_dir = OFFLINE_SPEC / "tokenizer"
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (tok_dir / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_parts(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, spec: str | Path = SPEC,
                with_vae: bool = True, seed: int = 0, dtypes: dict[str, torch.dtype] | None = None) -> SDParts:
    """SD 1.5's parts with seeded random weights, created directly on `device` ("meta": shapes only).

    Each part is created in `dtype` (or `dtypes[name]`), never cast afterwards: no second copy is made.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = configs(spec)
    dtypes = {"unet": dtype, "text_encoder": dtype, "vae": dtype, **(dtypes or {})}
    tok = tokenizer(cfg["text_encoder"]["vocab_size"])
    te_cfg = dict(cfg["text_encoder"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    te_cfg.pop("architectures", None)
    te_cfg.pop("model_type", None)
    torch.manual_seed(seed)
    with torch.device(device) if str(device) != "cpu" else contextlib.nullcontext():
        with _default_dtype(dtypes["unet"]):
            unet = UNet2DConditionModel.from_config(cfg["unet"])
        with _default_dtype(dtypes["text_encoder"]):
            te = CLIPTextModel(CLIPTextConfig(**te_cfg))
        vae = None
        if with_vae:
            with _default_dtype(dtypes["vae"]):
                vae = AutoencoderKL.from_config(cfg["vae"])
    sched = DDPMScheduler.from_config({k: v for k, v in cfg["scheduler"].items() if not k.startswith("_")})
    return SDParts(tok, te, vae, unet, sched, f"sd15-architecture (random weights, {device})")
