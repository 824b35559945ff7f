"""The offline default model: a tiny pipeline with Stable Diffusion's architecture, built with no download.

`data/offline-sd/` holds what defines it (the configs of each part and a CLIP BPE tokenizer trained on the
toy world's words). `offline_model_dir()` turns that into a real diffusers folder with seeded random weights,
once, in a cache, so that everything downstream loads it with the same `from_pretrained` code as SD 1.5.
When a pretrained toy model exists (`data/toy-sd/`, with weights), it is used instead: that is the seam.

Regenerate the shipped files (tokenizer, configs, sample instance images) with `python -m nbkit offline`
(nbkit.toy.spec).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# offline.DATA_DIR / offline.cache_dir: their old home, still importable
from nbkit.paths import DATA_DIR, SAMPLE_INSTANCE_DIR, cache_dir  # noqa: F401 - importable from here too

OFFLINE_SPEC = DATA_DIR / "offline-sd"  # configs + tokenizer, no weights
PRETRAINED_TOY = DATA_DIR / "toy-sd"  # a pretrained toy model with weights, when it exists
OFFLINE_RESOLUTION = 64  # image side the offline model works at
# The toy model learns its subject from 4 of the 5 sample pictures per step; from one at a time it learns the stripes
# but not the colours (measured: docs/findings.md). SD 1.5 uses 1 (objects) or 2 (faces).
OFFLINE_BATCH_SIZE = 4
# The sample subject's pictures show it on these backgrounds only: the others are "new contexts" for DreamBooth
# (blue is left out of both, the subject's stripes being blue).
SAMPLE_BACKGROUNDS = ("white", "yellow", "black")
NEW_CONTEXTS = ("green", "purple")

# Each part as small as the architecture allows while keeping every block type SD 1.5 has. The VAE has 3 blocks
# (64 px images -> 16x16x4 latents, a factor of 4) and no attention, so it can train on crops; the UNet attends to
# the text at 8x8 and 4x4 (the middle block too) and convolves only at 16x16, where attention would cost most.
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
)
VAE = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=[16, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8, mid_block_add_attention=False, scaling_factor=0.18215,
)
TEXT_ENCODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    hidden_act="quick_gelu", projection_dim=64,
)
SCHEDULER = dict(  # SD 1.5's training noise schedule
    _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    clip_sample=False,
)


def offline_model_dir(pretrained: bool = True) -> Path:
    """A diffusers folder for the offline default model: the pretrained toy model when it is there (and asked for),
    else the spec with seeded random weights, built on first use (a second or two)."""
    if pretrained and (PRETRAINED_TOY / "model_index.json").exists():
        return PRETRAINED_TOY
    if not (OFFLINE_SPEC / "model_index.json").exists():
        raise FileNotFoundError(
            f"The offline model's spec is missing from {OFFLINE_SPEC}. Run `python -m nbkit offline` from the kit's "
            "folder to regenerate it, or set NBKIT_DATA to the kit's data/ folder."
        )
    digest = hashlib.sha256(b"hub-layout")  # built with the text encoder in the Hub's layout (nbkit.models.layout)
    for p in sorted(OFFLINE_SPEC.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(OFFLINE_SPEC).as_posix().encode() + p.read_bytes())
    dest = cache_dir() / f"offline-sd-{digest.hexdigest()[:12]}"
    if not (dest / "unet" / "diffusion_pytorch_model.safetensors").exists():
        _materialize(OFFLINE_SPEC, dest)
    return dest


def _materialize(spec: Path, dest: Path, seed: int = 0) -> None:
    """Build every part from its config with seeded random weights and save it as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nbkit.models.layout import to_hub_layout

    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(spec, tmp)
    torch.manual_seed(seed)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(spec / "unet")).save_pretrained(tmp / "unet")
    AutoencoderKL.from_config(AutoencoderKL.load_config(spec / "vae")).save_pretrained(tmp / "vae")
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(spec / "text_encoder"))
    te.save_pretrained(tmp / "text_encoder")
    to_hub_layout(tmp / "text_encoder")  # the Hub's key layout, which transformers 4.x reads (spec has the 4.x vocab)
    if dest.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(dest)  # atomic: a half-built model is never picked up
