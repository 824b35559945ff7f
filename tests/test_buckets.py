"""Aspect-ratio bucketing (bucketing=True): portrait and landscape pictures train at a shape near their own, a batch
from one bucket, latents cached per bucket, resumable to the same weights."""

import json
from pathlib import Path

import diffusers.training_utils
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nbkit import ConfigError, TrainConfig, cli, load_parts, train
from nbkit.data import buckets
from nbkit.data.images import to_tensor
from nbkit.models.offline import SAMPLE_INSTANCE_DIR
from nbkit.training import batches

TOY = [(64, 64), (80, 48), (48, 80)]  # the offline model's default buckets at resolution 64, (height, width)


def test_default_buckets_cover_the_aspects_within_the_pixel_budget(parts):
    assert buckets.multiple_of(parts) == 16  # the offline VAE halves twice (x4), its UNet twice more (x4)
    assert buckets.ladder(64, 16) == TOY
    sd = buckets.ladder(512, 64)  # SD 1.5: 8 (VAE) x 8 (UNet)
    assert sd[0] == (512, 512) and {(640, 384), (384, 640), (704, 320), (320, 704)} <= set(sd)
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 for h, w in sd)  # the planner's bound holds
    assert {(1216, 832), (832, 1216)} <= set(buckets.ladder(1024, 64))  # SDXL's usual buckets


def test_pictures_go_to_the_bucket_nearest_their_aspect_with_diffusers_helper(monkeypatch):
    calls = []
    real = diffusers.training_utils.find_nearest_bucket
    monkeypatch.setattr(diffusers.training_utils, "find_nearest_bucket", lambda *a: calls.append(a) or real(*a))
    # PIL sizes are (width, height): portrait 3:4, landscape 4:3, square, tall 1:4, wide 16:9
    got = buckets.assign([(300, 400), (400, 300), (500, 500), (200, 800), (1920, 1080)], TOY)
    assert [TOY[b] for b in got] == [(80, 48), (48, 80), (64, 64), (80, 48), (48, 80)]
    assert len(calls) == 5
    assert buckets.bucket_list("64,64; 80,48", 64, 16) == [(64, 64), (80, 48)]  # diffusers' parse_buckets_string
    with pytest.raises(ConfigError, match="72,56: this model needs each side a multiple of 16"):
        buckets.bucket_list("64,64;72,56", 64, 16)


def test_bucket_settings_are_checked_up_front(instance_dir):
    base = TrainConfig(instance_dir=str(instance_dir), resolution=64)
    assert base.replace(bucketing=True, buckets="64,64;80,48;48,80").buckets
    for kw, msg in [({"buckets": "64,64"}, "bucketing=False"),
                    ({"bucketing": True, "buckets": "64x64"}, "height,width pairs"),
                    ({"bucketing": True, "buckets": "64,60"}, "64,60 is not a positive multiple of 8"),
                    ({"bucketing": True, "buckets": "64,64;96,64"}, "96,64 has 6144 pixels, more than")]:
        with pytest.raises(ConfigError, match=msg):
            base.replace(**kw)
    cfg, _, given = cli.build_config(cli.parse(["plan", "--bucketing", "--buckets", "64,64;80,48"]))
    assert cfg.bucketing is True and cfg.buckets == "64,64;80,48" and given == {"bucketing", "buckets"}


def test_a_bucket_crop_keeps_what_a_square_crop_cuts_off():
    im = Image.new("RGB", (300, 400), "white")  # a portrait picture whose top tenth is red (a head, say)
    im.paste((255, 0, 0), (0, 0, 300, 40))
    red = lambda t: bool(((t[0] > 0.9) & (t[1] < -0.9)).any())  # noqa: E731
    tall = to_tensor(im, (80, 48))
    assert tall.shape == (3, 80, 48) and red(tall)
    square = to_tensor(im, 64)
    assert square.shape == (3, 64, 64) and not red(square)
    assert torch.equal(to_tensor(im, (64, 64)), square)  # a square bucket is the square crop, bit for bit


def test_a_batch_comes_from_one_bucket_each_picture_once_an_epoch():
    of = [0, 1, 1, 2, 2, 2, 0]  # 7 pictures in 3 buckets
    for bs in (1, 2, 4):
        per_epoch = sum(-(-of.count(b) // bs) for b in (0, 1, 2))
        drawn = [buckets.batch_indices(of, bs, s, seed=3) for s in range(3 * per_epoch)]
        assert drawn == [buckets.batch_indices(of, bs, s, seed=3) for s in range(3 * per_epoch)]  # pure function
        assert all(len(b) == bs and len({of[i] for i in b}) == 1 for b in drawn)  # full batches, one bucket
        for e in range(3):
            seen = [i for b in drawn[e * per_epoch:(e + 1) * per_epoch] for i in b]
            assert set(seen) == set(range(7))  # every picture each epoch ...
            if bs == 1:
                assert sorted(seen) == list(range(7))  # ... exactly once when nothing needs filling up
    epoch = [buckets.batch_indices(of, 4, s, seed=3) for s in range(3)]  # bucket 1 (2 pictures) fills up 4
    assert any(sorted(b) == [1, 1, 2, 2] for b in epoch)
    assert drawn != [buckets.batch_indices(of, 4, s, seed=4) for s in range(len(drawn))]


@pytest.fixture
def odd_dir(tmp_path):
    """The toy subject's pictures put on portrait, landscape and square canvases of their background."""
    d = tmp_path / "odd"
    d.mkdir()
    for k, (w, h) in enumerate([(96, 160), (120, 200), (160, 96), (200, 120), (128, 128)]):
        src = Image.open(SAMPLE_INSTANCE_DIR / f"zwx_0{k}.png").convert("RGB")
        canvas = Image.new("RGB", (max(w, 64), max(h, 64)), src.getpixel((0, 0)))
        canvas.paste(src, ((canvas.width - 64) // 2, (canvas.height - 64) // 2))
        canvas.resize((w, h), Image.BICUBIC).save(d / f"p{k}.png")
    return d


def _spy(monkeypatch):
    """Record the Batches a run prepares and the bucket of every batch it draws."""
    seen = {"batches": [], "drawn": []}
    real_prepare, real_idx = batches.prepare, buckets.batch_indices

    def prepare(*a, **kw):
        seen["batches"].append(real_prepare(*a, **kw))
        return seen["batches"][-1]

    def idx(of, *a):
        out = real_idx(of, *a)
        seen["drawn"].append({of[i] for i in out})
        return out

    monkeypatch.setattr(batches, "prepare", prepare)
    monkeypatch.setattr(buckets, "batch_indices", idx)
    return seen


def test_bucketed_run_trains_caches_per_bucket_and_resumes_bit_for_bit(cfg, odd_dir, tmp_path, monkeypatch, capsys):
    c = cfg.replace(instance_dir=str(odd_dir), bucketing=True, train_batch_size=2, random_flip=True,
                    max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=None,
                    output_dir=str(tmp_path / "whole"))
    seen = _spy(monkeypatch)
    before = {k: v.clone() for k, v in load_parts("offline").unet.state_dict().items()}
    whole = train(c, load_parts("offline"), progress=False)
    assert "bucketing: 5 pictures in 3 bucket(s): 64x64 (h x w): 1, 80x48 (h x w): 2, 48x80 (h x w): 2" in \
        capsys.readouterr().out
    b = seen["batches"][0]
    assert [TOY[i] for i in b.bucket_of] == [(80, 48), (80, 48), (48, 80), (48, 80), (64, 64)]
    for i, lat in enumerate(b.inst_src):  # [flips, C, h/4, w/4]: cached at the bucket's size
        h, w = TOY[b.bucket_of[i]]
        assert lat.shape == (2, 4, h // 4, w // 4)
    assert len(seen["drawn"]) == 4 and all(len(d) == 1 for d in seen["drawn"])  # each batch from one bucket
    assert all(np.isfinite(whole.losses)) and len(whole.losses) == 4
    after = load_file(Path(whole.output_dir) / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after)

    resumed = train(c.replace(output_dir=str(tmp_path / "resumed"),
                              resume=str(tmp_path / "whole" / "checkpoints" / "step_000002")),
                    load_parts("offline"), progress=False)
    assert "Resuming from" in capsys.readouterr().out and resumed.info["resumed_from"].name == "step_000002"
    assert resumed.losses == whole.losses
    again = load_file(Path(resumed.output_dir) / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(again[k], after[k]) for k in after)  # bit for bit
    info = json.loads((tmp_path / "whole" / "checkpoints" / "step_000002" / "checkpoint.json").read_text())
    assert info["config"]["bucketing"] is True


def test_prior_preservation_crops_the_class_images_to_each_instance_bucket(cfg, odd_dir, tmp_path, monkeypatch):
    c = cfg.replace(instance_dir=str(odd_dir), bucketing=True, with_prior_preservation=True,
                    class_prompt="a photo of a star", class_dir=str(tmp_path / "cls"), num_class_images=2,
                    max_train_steps=3, checkpointing_steps=0)
    seen = _spy(monkeypatch)
    r = train(c, load_parts("offline"), progress=False)
    b = seen["batches"][0]
    assert all(Image.open(e.path).size == (64, 64) for e in b.class_ex)  # made square, as the model makes them
    assert sorted(b.class_src) == [0, 1, 2]  # a set of class latents for each bucket instances are in
    for k, lat in b.class_src.items():
        assert lat.shape == (2, 1, 4, TOY[k][0] // 4, TOY[k][1] // 4)
    log = json.loads((r.output_dir / "losses.json").read_text())
    assert all(np.isfinite([row["instance"], row["prior"]]).all() for row in log)
