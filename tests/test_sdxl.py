"""SDXL in the one training loop, on the kit's tiny SDXL (data/tiny-sdxl: SDXL's classes, seeded random weights)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nbkit import TrainConfig, load_parts, pipeline, train
from nbkit.export import formats as export
from nbkit.models import sdxl
from nbkit.training import guards

PROMPT = "a photo of zwx star"


@pytest.fixture
def xl_cfg(instance_dir, tmp_path):
    return TrainConfig(model="tiny-sdxl", method="lora", instance_dir=str(instance_dir),
                       output_dir=str(tmp_path / "out"), resolution=sdxl.TINY_SDXL_RESOLUTION, max_train_steps=3,
                       learning_rate=1e-2, validation_steps=0, sample_steps=3, checkpointing_steps=0)


def picture(pipe, seed: int = 0) -> np.ndarray:
    """One picture as floats (no 8-bit rounding), from a fixed seed."""
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                height=64, width=64, output_type="np").images[0]


def test_tiny_sdxl_has_sdxls_classes_and_the_builder_reproduces_it(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from nbkit.toy.tiny_sdxl import build

    shipped = sdxl.TINY_SDXL
    assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 5e6
    pipe = StableDiffusionXLPipeline.from_pretrained(shipped)  # the same from_pretrained code as SDXL base
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.vae.config.force_upcast
    assert json.loads((shipped / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    parts = load_parts("tiny-sdxl")
    assert isinstance(parts, sdxl.SDXLParts) and list(parts.text_encoders) == ["text_encoder", "text_encoder_2"]
    assert parts.default_resolution == sdxl.TINY_SDXL_RESOLUTION
    rebuilt = build(tmp_path / "tiny-sdxl")
    weights = sorted(p.relative_to(shipped) for p in shipped.rglob("*.safetensors"))
    assert len(weights) == 4
    for rel in weights:
        a, b = load_file(shipped / rel), load_file(rebuilt / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    for rel in sorted(p.relative_to(shipped) for p in shipped.rglob("config.json")):
        a, b = (json.loads((root / rel).read_text()) for root in (shipped, rebuilt))
        assert {k: v for k, v in a.items() if k != "transformers_version"} == \
               {k: v for k, v in b.items() if k != "transformers_version"}, rel


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """3 steps of SDXL LoRA on the UNet and both text encoders; the base weights as they were before."""
    import shutil

    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    root = tmp_path_factory.mktemp("sdxl_lora")
    shutil.copytree(SAMPLE_INSTANCE_DIR, root / "instance")
    parts = load_parts("tiny-sdxl")
    before = {n: export.snapshot(m) for n, m in parts.networks.items()}
    cfg = TrainConfig(model="tiny-sdxl", method="lora", instance_dir=str(root / "instance"),
                      output_dir=str(root / "out"), resolution=64, max_train_steps=3, learning_rate=1e-2,
                      validation_steps=0, sample_steps=3, checkpointing_steps=0, lora_text_encoder=True, seed=0)
    torch.manual_seed(0)
    return train(cfg, parts, progress=False), before


def test_sdxl_lora_trains_only_the_adapters(lora_run):
    r, before = lora_run
    assert len(r.losses) == 3 and all(math.isfinite(x) for x in r.losses)
    for name, module in r.parts.networks.items():
        assert export.max_weight_diff(module, before[name]) == 0.0, name  # base weights identical
    for name in ("unet", "text_encoder", "text_encoder_2"):  # each has adapters, and they moved (B starts at 0)
        ups = [v for k, v in getattr(r.parts, name).state_dict().items() if "lora_B" in k]
        assert ups and any(v.abs().sum() > 0 for v in ups), name
    adapters = {id(p) for m in r.parts.networks.values() for n, p in m.named_parameters() if "lora_" in n}
    assert {id(p) for p in r.method.params} == adapters  # what trained: the adapters, all of them


def test_sdxl_lora_exports_reload_to_the_same_picture(lora_run, tmp_path):
    r, _ = lora_run
    trained = picture(r.pipeline("ddim"))
    base = picture(pipeline(load_parts("tiny-sdxl"), "ddim"))
    assert np.abs(trained - base).max() > 1e-3  # the LoRA changes the picture: the reloads below mean something

    sd = load_file(r.saved)  # the diffusers file the run saved (StableDiffusionXLPipeline.save_lora_weights)
    assert {k.split(".")[0] for k in sd} == {"unet", "text_encoder", "text_encoder_2"}
    assert export.lora_rank_alpha(r.saved) == {"unet": (4, 4.0), "text_encoder": (4, 4.0),
                                               "text_encoder_2": (4, 4.0)}
    kohya = export.lora_kohya(r, tmp_path / "subject.safetensors", dtype="fp32")
    ksd = load_file(kohya)
    assert {k.split("_")[1] for k in ksd} == {"unet", "te1", "te2"}  # lora_unet_, lora_te1_, lora_te2_
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in ksd)
    assert export.lora_rank_alpha(kohya) == {"unet": (4, 4.0), "text_encoder": (4, 4.0), "text_encoder_2": (4, 4.0)}
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    for folder, name in ((r.saved.parent, r.saved.name), (kohya.parent, kohya.name)):
        pipe = pipeline(load_parts("tiny-sdxl"), "ddim")  # the base model, fresh
        pipe.load_lora_weights(str(folder), weight_name=name)  # diffusers reads kohya keys too
        assert np.abs(picture(pipe) - trained).max() < 1e-4, name


def _count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda m, a, k, out: calls.append(1), with_kwargs=True)
    return calls


def test_prompt_embeddings_cached_and_size_conditioning_passed(xl_cfg):
    parts = load_parts("tiny-sdxl")
    te_calls = {n: _count_calls(m) for n, m in parts.text_encoders.items()}
    seen = []
    parts.unet.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("added_cond_kwargs")), with_kwargs=True)
    r = train(xl_cfg, parts, progress=False)
    assert all(math.isfinite(x) for x in r.losses)
    # text encoders frozen: each ran once, encoding the (one) training prompt for the cache; never during the steps
    assert {n: len(c) for n, c in te_calls.items()} == {"text_encoder": 1, "text_encoder_2": 1}
    assert len(seen) == 3 and all(set(k) == {"text_embeds", "time_ids"} for k in seen)
    # the sample pictures are 64x64: original size, crop corner (0, 0), target size
    assert all(k["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] for k in seen)
    assert seen[0]["text_embeds"].shape == (1, parts.text_encoder_2.config.projection_dim)


def test_sizes_are_original_crop_and_target():
    from PIL import Image

    from nbkit.data.images import to_tensor, to_tensor_sized

    img = Image.new("RGB", (100, 80), "red")  # w, h
    px, size = to_tensor_sized(img, 64)
    assert size == (80, 100, 0, 8, 64, 64) and torch.equal(px, to_tensor(img, 64))  # resized 80x64, centre crop
    rng = np.random.default_rng(3)
    _, (h, w, top, left, *_) = to_tensor_sized(img, 64, center_crop=False, rng=np.random.default_rng(3))
    _, flipped = to_tensor_sized(img, 64, center_crop=False, flip=True, rng=rng)
    assert (h, w, top) == (80, 100, 0) and flipped[3] == 80 - 64 - left  # the mirrored crop's corner


def test_sdxl_vae_stays_fp32_and_decodes_in_fp32_under_autocast(tmp_path):
    parts = load_parts("tiny-sdxl")
    assert parts.frozen_dtype("vae", torch.float16) == torch.float32  # force_upcast: SDXL's VAE overflows in fp16
    assert parts.frozen_dtype("unet", torch.float16) == torch.float16
    z = torch.randn(1, 4, 16, 16).to(torch.bfloat16)  # latents as an autocast UNet hands them over
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unguarded = parts.vae.decode(z).sample
    pipeline(parts, "ddim")  # the pipeline guards the VAE
    with torch.no_grad():
        plain = parts.vae.decode(z.float()).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = parts.vae.decode(z).sample
    assert unguarded.dtype == torch.bfloat16  # without the guard the VAE's convolutions run in half precision
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    # the fp16-safe VAE (config force_upcast=false, as madebyollin/sdxl-vae-fp16-fix) runs in half precision
    from diffusers import AutoencoderKL

    cfg = dict(AutoencoderKL.load_config(sdxl.TINY_SDXL / "vae"), force_upcast=False)
    AutoencoderKL.from_config(cfg).save_pretrained(tmp_path / "fp16-vae")
    other = load_parts("tiny-sdxl", vae=str(tmp_path / "fp16-vae"))
    assert not other.vae.config.force_upcast and other.frozen_dtype("vae", torch.float16) == torch.float16


def test_nan_guard_names_the_sdxl_vae(xl_cfg, monkeypatch):
    parts = load_parts("tiny-sdxl")
    msg = str(guards.non_finite_loss(float("nan"), 0, None, "fp16", parts.nan_causes("fp16")))
    assert "SDXL's VAE overflows in fp16" in msg and sdxl.FP16_FIX_VAE in msg
    monkeypatch.setattr(F, "mse_loss", lambda a, b, **k: a * float("nan"))
    with pytest.raises(FloatingPointError, match="SDXL's VAE overflows in fp16"):
        train(xl_cfg, parts, progress=False)


def test_nan_latents_stop_the_run_before_training(xl_cfg, monkeypatch):
    parts = load_parts("tiny-sdxl")
    real = parts.vae.encode

    def overflowing(x, *args, **kwargs):  # what SDXL's VAE does in fp16
        out = real(x, *args, **kwargs)
        out.latent_dist.mean.fill_(float("nan"))
        return out

    monkeypatch.setattr(parts.vae, "encode", overflowing)
    with pytest.raises(FloatingPointError, match="non-finite latents.*SDXL's VAE overflows in fp16"):
        train(xl_cfg, parts, progress=False)


def test_sdxl_dreambooth_unet_only_saves_a_folder_that_reloads(xl_cfg):
    from diffusers import StableDiffusionXLPipeline

    parts = load_parts("tiny-sdxl")
    te0 = {n: export.snapshot(m) for n, m in parts.text_encoders.items()}
    r = train(xl_cfg.replace(method="dreambooth", max_train_steps=1, learning_rate=1e-4), parts, progress=False)
    assert all(export.max_weight_diff(m, te0[n]) == 0.0 for n, m in r.parts.text_encoders.items())
    pipe = StableDiffusionXLPipeline.from_pretrained(r.saved)
    mine, theirs = r.parts.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert np.abs(picture(pipe) - picture(r.pipeline("ddim"))).max() < 1e-4
    from nbkit import take_home

    done = take_home(r, r.output_dir / "export", dtype="fp32", steps=3)  # SDXL: no single file (yet), said so
    assert list(done) == ["diffusers"] and done["diffusers"].mean_pixel_diff < 1.0
    with pytest.raises(export.ExportError, match="SDXL's single file"):
        take_home(r, r.output_dir / "export", formats=["single_file"], check=False)


def test_sdxl_lora_take_home_writes_and_checks_both_files(lora_run, tmp_path):
    from nbkit import take_home

    r, _ = lora_run
    done = take_home(r, tmp_path, dtype="fp32", steps=3)
    assert list(done) == ["lora_diffusers", "lora_kohya"]
    assert all(item.max_pixel_diff <= 1 for item in done.values()), {k: v.max_pixel_diff for k, v in done.items()}


def test_textual_inversion_on_sdxl_says_what_to_use(xl_cfg):
    with pytest.raises(ValueError, match="text encoders.*method='lora'"):
        train(xl_cfg.replace(method="textual_inversion", instance_prompt="a photo of <zwx>"), load_parts("tiny-sdxl"),
              progress=False)


def test_sdxl_lora_on_the_t4_code_path(xl_cfg, monkeypatch):
    """The T4 rehearsal (fp16 autocast and GradScaler on the CPU): frozen networks in fp16 but the VAE in fp32, the
    text encoders' adapters trained under autocast, validation pictures decoded without overflow."""
    from PIL import Image

    monkeypatch.setenv("NBKIT_T4_REHEARSAL", "1")
    r = train(xl_cfg.replace(lora_text_encoder=True, learning_rate=1e-3, validation_steps=3,
                             validation_prompts=[PROMPT], num_validation_images=1), load_parts("tiny-sdxl"),
              progress=False)
    assert r.info["precision"] == "fp16" and all(math.isfinite(x) for x in r.losses)
    base = {n: {p.dtype for k, p in m.named_parameters() if "lora_" not in k} for n, m in r.parts.networks.items()}
    assert base == {"unet": {torch.float16}, "text_encoder": {torch.float16}, "text_encoder_2": {torch.float16},
                    "vae": {torch.float32}}
    assert np.asarray(Image.open(r.validation[3])).std() > 1  # a picture, not a black (NaN) square


def test_sdxl_lora_resumed_ends_with_the_same_adapters(xl_cfg, tmp_path):
    """A checkpoint holds both text encoders' adapters: stopped at step 2 and resumed, the run ends where an
    uninterrupted one does."""
    cfg = xl_cfg.replace(lora_text_encoder=True, learning_rate=1e-3)
    whole = train(cfg.replace(output_dir=str(tmp_path / "whole")), load_parts("tiny-sdxl"), progress=False)
    first = cfg.replace(output_dir=str(tmp_path / "cut"), max_train_steps=2, checkpointing_steps=2)
    train(first, load_parts("tiny-sdxl"), progress=False)
    resumed = train(first.replace(max_train_steps=3), load_parts("tiny-sdxl"), progress=False)
    assert resumed.info["resumed_from"] is not None
    a, b = (export.lora_state_dicts(r) for r in (whole, resumed))
    assert a.keys() == b.keys() == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


def test_frozen_networks_load_in_half_precision_and_the_vae_in_fp32():
    """A GPU run loads the networks no step changes in fp16 (SDXL base's UNet: 5.1 instead of 10.3 GB of host RAM,
    what a free Colab has room for); trained ones and the VAE stay fp32."""
    import torch

    from nbkit import TrainConfig, load_parts
    from nbkit.training import methods

    lora = methods.frozen_networks(TrainConfig(method="lora"))
    assert set(lora) == {"unet", "text_encoder", "text_encoder_2"}
    assert methods.frozen_networks(TrainConfig(method="dreambooth")) == ("text_encoder", "text_encoder_2")
    assert methods.frozen_networks(TrainConfig(method="dreambooth", train_text_encoder=True)) == ()
    assert methods.frozen_networks(TrainConfig(method="textual_inversion")) == ("unet",)
    parts = load_parts("tiny-sdxl", half=lora)
    dtypes = {n: next(m.parameters()).dtype for n, m in parts.networks.items()}
    assert dtypes == {"unet": torch.float16, "text_encoder": torch.float16, "text_encoder_2": torch.float16,
                      "vae": torch.float32}
    assert parts.tokenizer_2.model_max_length == load_parts("tiny-sdxl").tokenizer_2.model_max_length
