import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from nbkit import generate, load_parts, pipeline, train
from nbkit.data.images import load_folder, to_tensor


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {k for k, v in before.items() if k in after and (v.shape != after[k].shape or not torch.equal(v, after[k]))}


def test_dreambooth_trains_the_unet_only(cfg, parts):
    unet0, te0, vae0 = snapshot(parts.unet), snapshot(parts.text_encoder), snapshot(parts.vae)
    r = train(cfg, parts, progress=False)
    assert all(math.isfinite(x) for x in r.losses) and len(r.losses) == 2
    assert len(changed(unet0, r.parts.unet)) > 0.9 * len(unet0)
    assert not changed(te0, r.parts.text_encoder) and not changed(vae0, r.parts.vae)


def test_saved_folder_reloads_with_identical_weights(cfg, parts):
    r = train(cfg, parts, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(r.saved)
    for name in ("unet", "text_encoder", "vae"):
        mine, theirs = getattr(r.parts, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    files = {p.name for p in r.saved.rglob("*") if p.is_file()}
    assert "diffusion_pytorch_model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    a = generate(pipeline(r.parts, "ddim"), "a star", seeds=[1], steps=3)[0]
    b = generate(pipe, "a star", seeds=[1], steps=3, scheduler="ddim")[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_fp16_save_honoured(cfg, parts):
    r = train(cfg.replace(save_dtype="fp16"), parts, progress=False)
    sd = load_file(r.saved / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert r.parts.unet.dtype == torch.float32  # the in-memory model keeps its precision


def test_text_encoder_trains_when_asked_and_stops_when_told(cfg, parts):
    te0 = snapshot(parts.text_encoder)
    r = train(cfg.replace(train_text_encoder=True), parts, progress=False)
    assert len(changed(te0, r.parts.text_encoder)) > 0.9 * len(te0)
    fresh = load_parts("offline")
    te0 = snapshot(fresh.text_encoder)
    r = train(cfg.replace(train_text_encoder=True, text_encoder_steps=0), fresh, progress=False)
    assert not changed(te0, r.parts.text_encoder)


def test_lora_trains_only_adapters_and_reloads(cfg, parts):
    unet0, te0 = snapshot(parts.unet), snapshot(parts.text_encoder)
    r = train(cfg.replace(method="lora", lora_rank=4, learning_rate=1e-2), parts, progress=False)
    moved = changed(unet0, r.parts.unet)
    lora_keys = [k for k in r.parts.unet.state_dict() if "lora" in k]
    assert lora_keys and not moved  # base weights untouched (adapter keys are new, not in the snapshot)
    assert not changed(te0, r.parts.text_encoder)
    assert r.saved.name == "pytorch_lora_weights.safetensors" and r.saved.stat().st_size < 1_000_000
    sd = load_file(r.saved)
    assert all("lora" in k for k in sd) and any(v.abs().sum() > 0 for k, v in sd.items()
                                                if "lora_B" in k or "lora.up" in k)
    pipe = StableDiffusionPipeline.from_pretrained(load_parts("offline").source)
    pipe.load_lora_weights(r.saved.parent, weight_name=r.saved.name)
    a = generate(pipeline(r.parts, "ddim"), "a star", seeds=[2], steps=3)[0]
    b = generate(pipe, "a star", seeds=[2], steps=3, scheduler="ddim")[0]
    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


def test_textual_inversion_changes_only_its_token(cfg, parts):
    unet0, te0 = snapshot(parts.unet), snapshot(parts.text_encoder)
    n_old = len(parts.tokenizer)
    c = cfg.replace(method="textual_inversion", instance_prompt="a photo of <zwx>", num_vectors=2, learning_rate=5e-2)
    r = train(c, parts, progress=False)
    assert not changed(unet0, r.parts.unet)
    emb = r.parts.text_encoder.get_input_embeddings().weight.detach()
    key = next(k for k in te0 if k.endswith("token_embedding.weight"))
    assert torch.equal(emb[:n_old], te0[key])
    ids = r.method.extra["token_ids"]
    assert ids == [n_old, n_old + 1]
    init = te0[key][parts.tokenizer.convert_tokens_to_ids("star</w>")]
    assert not torch.allclose(emb[ids[0]], init)  # the new vector moved away from its initializer
    other = {k: v for k, v in te0.items() if "token_embedding" not in k}
    assert not changed(other, r.parts.text_encoder)
    saved = load_file(r.saved)
    assert list(saved) == ["<zwx>"] and saved["<zwx>"].shape == (2, emb.shape[1])
    assert r.saved.stat().st_size < 10_000  # a tiny file
    pipe = StableDiffusionPipeline.from_pretrained(load_parts("offline").source)
    pipe.load_textual_inversion(str(r.saved), token="<zwx>")
    got = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(["<zwx>", "<zwx>_1"])]
    assert torch.allclose(got, emb[ids])


def test_v_prediction_target_is_used_when_the_scheduler_says_so(cfg, parts, monkeypatch):
    parts.noise_scheduler = DDPMScheduler.from_config(parts.noise_scheduler.config, prediction_type="v_prediction")
    calls = []
    orig = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: calls.append(1) or orig(self, *a))
    r = train(cfg, parts, progress=False)
    assert r.info["prediction_type"] == "v_prediction" and len(calls) == cfg.max_train_steps


def test_noise_offset_shifts_each_channel_of_the_noise(cfg, parts, monkeypatch):
    seen = []
    orig = DDPMScheduler.add_noise
    monkeypatch.setattr(DDPMScheduler, "add_noise",
                        lambda self, x, noise, t: seen.append(noise) or orig(self, x, noise, t))
    train(cfg.replace(max_train_steps=4, noise_offset=0.0), parts, progress=False)
    plain = torch.cat(seen).mean(dim=(2, 3)).abs().mean().item()
    seen.clear()
    train(cfg.replace(max_train_steps=4, noise_offset=1.0, output_dir=cfg.output_dir + "-offset"),
          load_parts("offline"), progress=False)
    offset = torch.cat(seen).mean(dim=(2, 3)).abs().mean().item()
    assert plain < 0.2 and offset > 0.4, (plain, offset)  # per-channel means: ~1/side without, ~N(0, 1) with


def test_auto_noise_settings_are_the_models_pretraining_ones(cfg, parts, tmp_path):
    r = train(cfg.replace(max_train_steps=1), parts, progress=False)
    pre = parts.pretraining  # the toy model says how it was pretrained; SD 1.5 does not (then: neither)
    assert (r.info["noise_offset"], r.info["snr_gamma"]) == (pre.get("offset_noise", 0.0), pre.get("snr_gamma", 0.0))
    assert (r.info["noise_offset"], r.info["snr_gamma"]) == ((0.1, 5.0) if pre else (0.0, 0.0))
    (tmp_path / "pretrain_config.json").write_text('{"offset_noise": 0.05}')
    parts.source = str(tmp_path)
    assert parts.pretraining == {"offset_noise": 0.05}


def test_min_snr_weighting_lowers_the_loss_of_easy_timesteps(cfg, parts):
    plain = train(cfg.replace(max_train_steps=1, snr_gamma=0.0), parts, progress=False).losses[0]
    weighted = train(cfg.replace(max_train_steps=1, snr_gamma=1e-3, output_dir=cfg.output_dir + "-snr"),
                     load_parts("offline"), progress=False).losses[0]
    assert math.isfinite(weighted) and weighted < 0.5 * plain, (plain, weighted)  # weight min(snr, 1e-3) / snr


def test_prior_preservation_generates_once_and_adds_the_prior_term(cfg, parts, tmp_path):
    c = cfg.replace(with_prior_preservation=True, class_prompt="a photo of a star", class_dir=str(tmp_path / "cls"),
                    num_class_images=3)
    r = train(c, parts, progress=False)
    pngs = sorted((tmp_path / "cls").glob("class_*.png"))
    assert len(pngs) == 3
    log = json.loads((r.output_dir / "losses.json").read_text())
    assert all({"instance", "prior"} <= set(row) for row in log)
    assert all(abs(row["loss"] - (row["instance"] + row["prior"])) < 1e-4 for row in log)
    stamps = [p.stat().st_mtime_ns for p in pngs]
    train(c, load_parts("offline"), progress=False)
    assert [p.stat().st_mtime_ns for p in pngs] == stamps  # cached: nothing regenerated


def _fixed_loss(parts, instance_dir):
    """Denoising loss on the instance images at fixed noise and timesteps (lower = the model learned them)."""
    g = torch.Generator().manual_seed(123)
    px = torch.stack([to_tensor(e.image, 64) for e in load_folder(instance_dir, 64)])
    with torch.no_grad():
        lat = parts.vae.encode(px).latent_dist.mean * parts.vae.config.scaling_factor
        ids = parts.tokenizer(["a photo of zwx star"] * len(px), padding="max_length", max_length=77,
                              return_tensors="pt").input_ids
        emb = parts.text_encoder(ids)[0]
        total = 0.0
        for t in (100, 300, 500, 700):
            noise = torch.randn(lat.shape, generator=g)
            ts = torch.full((len(lat),), t)
            total += F.mse_loss(parts.unet(parts.noise_scheduler.add_noise(lat, noise, ts), ts, emb).sample,
                                noise).item()
    return total / 4


def test_learning_is_measured(cfg, parts, instance_dir):
    before = _fixed_loss(parts, instance_dir)
    r = train(cfg.replace(max_train_steps=40, learning_rate=1e-3), parts, progress=False)
    after = _fixed_loss(r.parts, instance_dir)
    assert after < 0.8 * before, (before, after)


def test_same_seed_same_weights(cfg):
    a = train(cfg, load_parts("offline"), progress=False)
    b = train(cfg.replace(output_dir=cfg.output_dir + "2"), load_parts("offline"), progress=False)
    assert a.losses == b.losses
    sa, sb = a.parts.unet.state_dict(), b.parts.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_validation_grids_written(cfg, parts):
    r = train(cfg.replace(validation_prompts=["a photo of zwx star", "a red circle"], validation_steps=1,
                          num_validation_images=2), parts, progress=False)
    assert sorted(r.validation) == [1, 2]
    from PIL import Image

    assert Image.open(r.validation[2]).size == (128, 128)  # 2 prompts x 2 seeds at 64 px


def test_non_finite_loss_stops_the_run(cfg, parts, monkeypatch):
    monkeypatch.setattr(F, "mse_loss", lambda a, b, **k: a * float("nan"))
    with pytest.raises(FloatingPointError, match="fp16 overflow"):
        train(cfg, parts, progress=False)
    assert not (cfg.output_dir and (__import__("pathlib").Path(cfg.output_dir) / "model").exists())
