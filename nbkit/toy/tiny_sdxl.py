"""The kit's tiny SDXL (`data/tiny-sdxl/`, `load_parts("tiny-sdxl")`), remade: `python -m nbkit tiny-sdxl`.

SDXL's classes and layout, each part as small as they allow: StableDiffusionXLPipeline, CLIPTextModel and
CLIPTextModelWithProjection (with the offline model's toy-world tokenizer, twice), a UNet2DConditionModel with
`addition_embed_type="text_time"` (the pooled embedding and the size conditioning), linear attention projections
and a transformer depth per block, SDXL's VAE settings (scaling factor, force_upcast) and its Euler schedule.
Seeded random weights, not pretrained (the CPU budget of this kit's one-off builds did not allow it): it trains,
samples, exports and reloads exactly as SDXL does, but its pictures are noise-like - it shows the mechanics, not
what SDXL learns. Loaded with the same from_pretrained code as stabilityai/stable-diffusion-xl-base-1.0.
"""

from __future__ import annotations

from pathlib import Path

from nbkit.models.offline import OFFLINE_SPEC
from nbkit.models.sdxl import TINY_SDXL, TINY_SDXL_RESOLUTION

# SDXL base's layout scaled down: 2 levels (SDXL: 3), attention at the lower one only (as SDXL's first level has
# none), 1 and 2 transformer layers (SDXL: 0, 2, 10), the time_ids embedded in 8 dims per number (SDXL: 256); its
# added-condition input is the pooled embedding (32) + 6 * 8 = 80 (SDXL: 1280 + 6 * 256 = 2816).
UNET = dict(
    sample_size=TINY_SDXL_RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2],
    attention_head_dim=[2, 4], use_linear_projection=True, cross_attention_dim=64, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
)
VAE = dict(  # 64 px -> 16x16x4 latents; SDXL's scaling factor, and force_upcast: its VAE overflows in fp16
    sample_size=TINY_SDXL_RESOLUTION, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=[8, 16, 32], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8, scaling_factor=0.13025, force_upcast=True,
)
TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
TEXT_ENCODER_2 = dict(TEXT_ENCODER, hidden_act="gelu")  # SDXL's second (OpenCLIP bigG) uses gelu, and projects
SCHEDULER = dict(  # SDXL base's
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)


def build(dest: str | Path = TINY_SDXL, seed: int = 0) -> Path:
    """Build the tiny SDXL with seeded random weights and save it as a diffusers folder (safetensors) at `dest`."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(OFFLINE_SPEC / "tokenizer")
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE), unet=UNet2DConditionModel(**UNET),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, **ids)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2, **ids)),
        tokenizer=tok, tokenizer_2=tok, scheduler=EulerDiscreteScheduler(**SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # the slow tokenizer's files too, so older transformers load it
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(OFFLINE_SPEC / "tokenizer" / name, tmp / sub / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """`python -m nbkit tiny-sdxl`: remake data/tiny-sdxl (or --out)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nbkit tiny-sdxl", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(TINY_SDXL), help=f"where to write it (default: {TINY_SDXL})")
    path = build(ap.parse_args(argv).out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
