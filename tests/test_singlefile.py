"""Single-file export in the original SD layout: exact key layout for SD 1.5 (and 2.x), round trips through diffusers'
own original->diffusers converters, and reload with from_single_file giving the same weights and images."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _images import assert_same_picture, draw

from nbkit.export import singlefile as sf
from nbkit.export.takehome import pixel_difference

# Keys and shapes of the original SD 1.5 checkpoint (v1-5-pruned-emaonly), a sample covering every renaming rule.
_REFERENCE = json.loads((Path(__file__).parent / "data" / "sd15_original_keys.json").read_text())
SD15_KEYS = {key: tuple(shape) for key, shape in _REFERENCE["shapes"].items()}
SD15_COUNTS = {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 197}


def empty_models(version: int):
    """SD 1.5 or SD 2.x architecture with weights on the meta device (no memory, no download)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_kw = dict(cross_attention_dim=768) if version == 1 else dict(
        cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    te_kw = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12) \
        if version == 1 else dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                  num_hidden_layers=23, hidden_act="gelu", projection_dim=512)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_kw)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **te_kw))
    return unet, vae, te


def convert(unet, vae, te, layout="auto"):
    sd = {}
    sd.update(sf.unet_to_original(unet.state_dict(), unet.config))
    sd.update(sf.vae_to_original(vae.state_dict(), vae.config))
    sd.update(sf.text_encoder_to_original(te.state_dict(), te.config, layout))
    return sd


def with_text_model(sd):
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def test_sd15_layout_matches_the_original_checkpoint():
    unet, vae, te = empty_models(1)
    sd = convert(unet, vae, te)
    for key, shape in SD15_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, (key, tuple(sd[key].shape), shape)
    for prefix, n in SD15_COUNTS.items():
        assert sum(k.startswith(prefix) for k in sd) == n, prefix
    assert len(sd) == sum(SD15_COUNTS.values())
    assert not [k for k in sd if any(w in k for w in ("down_blocks", "up_blocks", "resnets", "attentions", "mid_block",
                                                      "time_embedding", "conv_shortcut", "to_out.0.weight"))
                and "transformer_blocks" not in k]


@pytest.mark.parametrize("version", [1, 2])
def test_round_trip_through_diffusers_converters(version):
    """diffusers' own single-file code recognises the export (SD 1 vs 2, CLIP vs OpenCLIP), and its
    original -> diffusers converters give back every key with its shape."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
        is_clip_model,
        is_open_clip_model,
    )

    unet, vae, te = empty_models(version)
    sd = convert(unet, vae, te)
    assert infer_diffusers_model_type(sd) == f"v{version}"
    assert (is_clip_model(sd), is_open_clip_model(sd)) == ((True, False) if version == 1 else (False, True))
    back = {
        "unet": convert_ldm_unet_checkpoint(sd, unet.config),
        "vae": convert_ldm_vae_checkpoint(sd, vae.config),
        "te": convert_ldm_clip_checkpoint(sd) if version == 1 else
        convert_open_clip_checkpoint(SimpleNamespace(config=te.config), sd),
    }
    for name, module in (("unet", unet), ("vae", vae), ("te", te)):
        ref = module.state_dict() if name != "te" else with_text_model(module.state_dict())
        ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in back[name].items() if not k.endswith("position_ids")}
        assert set(got) == set(ref), (name, sorted(set(got) ^ set(ref))[:5])
        assert all(got[k].shape == ref[k].shape for k in ref), name
    if version == 2:
        assert "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight" in sd
        assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)


def test_round_trip_keeps_every_value(parts):
    """On real tensors (the offline model): diffusers' converters give back exactly the weights we exported."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd = sf.to_original(parts)
    for back, module in ((convert_ldm_unet_checkpoint(sd, parts.unet.config), parts.unet),
                         (convert_ldm_vae_checkpoint(sd, parts.vae.config), parts.vae),
                         (with_text_model(convert_ldm_clip_checkpoint(sd)), parts.text_encoder)):
        ref = with_text_model(module.state_dict()) if module is parts.text_encoder else module.state_dict()
        assert all(torch.equal(back[k], v) for k, v in ref.items())


@pytest.mark.parametrize("half", [False, True])
def test_export_reloads_with_from_single_file(parts, tmp_path, half):
    from safetensors import safe_open

    from nbkit import pipeline

    path = sf.save_single_file(parts, tmp_path / "model.safetensors", half=half, metadata={"base_model": "offline"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["nbkit.dtype"] == ("fp16" if half else "fp32")
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == (torch.float16 if half else torch.float32)
    reloaded = sf.load_single_file(path, parts.source)
    diffs = sf.weight_differences(parts, reloaded)
    if half:
        assert all(d < 2e-3 for d in diffs.values()), diffs  # fp16 rounding only
    else:
        assert diffs == {"unet": 0.0, "vae": 0.0, "text_encoder": 0.0}
    assert_same_picture(pipeline(parts), reloaded, mean=1.0 if half else 1e-3)


def test_lora_is_merged_into_the_checkpoint(cfg, tmp_path):
    import nbkit

    result = nbkit.train(cfg.replace(method="lora", max_train_steps=2, learning_rate=1e-2), progress=False)
    pipe = result.pipeline("ddim")
    before = draw(pipe)
    path = sf.save_single_file(result, tmp_path / "lora_merged.safetensors")
    assert pixel_difference(draw(pipe), before) == (0, 0), "exporting leaves the in-memory LoRA model as it was"
    reloaded = sf.load_single_file(path, result.parts.source)
    assert_same_picture(pipe, reloaded, mean=0.5)
    base = nbkit.load_parts("offline")
    changed = {k for k, v in base.unet.state_dict().items() if not torch.equal(v, reloaded.unet.state_dict()[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") or ".to_out.0." in k for k in changed)
    assert sf.weight_differences(base, reloaded)["vae"] == 0.0


def test_clear_errors(parts, tmp_path):
    from nbkit.export import formats

    assert sf.ExportError is formats.ExportError  # one class: `except ExportError` catches every exporter's errors
    with pytest.raises(sf.ExportError, match="safetensors"):
        sf.save_single_file(parts, tmp_path / "model.ckpt")
    parts.tokenizer.add_tokens(["<zwx>"])
    with pytest.raises(sf.ExportError, match="textual inversion"):
        sf.to_original(parts)
    with pytest.raises(sf.ExportError, match="no place"):
        sf.unet_to_original({"add_embedding.linear_1.weight": torch.zeros(1)}, parts.unet.config)
    with pytest.raises(sf.ExportError, match="not a folder"):
        sf.load_single_file(tmp_path / "x.safetensors", tmp_path / "missing")
