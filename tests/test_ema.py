"""use_ema: the saved model is diffusers' EMA of the raw weights, training continues on the raw weights, and a
resumed run ends with the same average as one never stopped."""

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nbkit import ConfigError, TrainConfig, load_parts, train
from nbkit.cli import _parser, build_config
from nbkit.memory import planner
from nbkit.models import sd15
from nbkit.training.checkpoint import ResumeError
from nbkit.training.savers import remedies

DECAY = 0.1  # update 1 copies the weights; from update 2 on min(0.1, n / (n + 9)) = 0.1


def unet_file(out) -> dict:
    return load_file(Path(out) / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def raw(ckpt: Path) -> dict:
    """The raw UNet weights a checkpoint holds, named as in the saved model."""
    return {k.removeprefix("unet."): v for k, v in load_file(ckpt / "weights-00001.safetensors").items()}


@pytest.fixture(scope="module")
def runs(offline_dir, tmp_path_factory):
    """Three steps with and without EMA (a checkpoint after every step; validation pictures mid-run)."""
    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    tmp = tmp_path_factory.mktemp("ema")
    base = TrainConfig(instance_dir=str(SAMPLE_INSTANCE_DIR), resolution=64, max_train_steps=3, learning_rate=1e-3,
                       sample_steps=2, validation_prompts=["a photo of zwx star"], validation_steps=1,
                       num_validation_images=1, checkpointing_steps=1, checkpoints_total_limit=None)
    on = train(base.replace(output_dir=str(tmp / "on"), use_ema=True, ema_decay=DECAY), load_parts("offline"),
               progress=False)
    off = train(base.replace(output_dir=str(tmp / "off")), load_parts("offline"), progress=False)
    return on, off


def test_the_saved_model_is_the_analytic_average_of_the_raw_weights(runs):
    on, _ = runs
    steps = [raw(on.output_dir / "checkpoints" / f"step_{n:06d}") for n in (1, 2, 3)]
    saved = unet_file(on.output_dir)
    assert saved.keys() == steps[0].keys()
    moved = 0
    for key in saved:
        e = steps[0][key].clone()  # update 1: the average is the weights
        for w in steps[1:]:
            e = e - (1 - DECAY) * (e - w[key])  # e <- DECAY * e + (1 - DECAY) * w, as diffusers computes it
        assert torch.allclose(saved[key], e, atol=1e-7, rtol=0), key
        moved += not torch.equal(saved[key], steps[-1][key])
    assert moved > len(saved) // 2  # the average is not the last weights
    last = load_file(on.output_dir / "checkpoints" / "step_000003" / "ema-00001.safetensors")
    assert all(torch.equal(last[f"ema.unet.{k}"], saved[k]) for k in saved)  # the checkpoint holds the same average
    # the parts the run returns hold the average too (what r.pipeline() samples)
    assert torch.equal(on.parts.unet.state_dict()["conv_in.weight"], saved["conv_in.weight"])


def test_training_continues_on_the_raw_weights_and_off_changes_nothing(runs):
    on, off = runs
    assert on.losses == off.losses  # the average never feeds back into training, validation pictures or not
    for n in (1, 2, 3):
        a, b = (raw(r.output_dir / "checkpoints" / f"step_{n:06d}") for r in runs)
        assert all(torch.equal(a[k], b[k]) for k in a), n
    assert all(torch.equal(v, raw(off.output_dir / "checkpoints" / "step_000003")[k])
               for k, v in unet_file(off.output_dir).items())  # without EMA the saved model is the raw weights
    assert not list((off.output_dir / "checkpoints" / "step_000003").glob("ema-*"))
    assert sorted(on.validation) == sorted(off.validation) == [1, 2, 3]


def test_validation_pictures_are_drawn_from_the_average(runs):
    import numpy as np
    from PIL import Image

    on, off = runs
    px = {n: [np.asarray(Image.open(r.validation[n]), dtype=np.int16) for r in runs] for n in (1, 3)}
    assert np.array_equal(*px[1])  # after update 1 the average is the weights
    assert np.abs(px[3][0] - px[3][1]).max() > 0  # after update 3 it is not: the pictures differ


def test_resume_with_ema_ends_bit_identical(cfg, tmp_path):
    c = cfg.replace(use_ema=True, checkpointing_steps=2, ema_decay=0.5)
    part = c.replace(output_dir=str(tmp_path / "resumed"))
    train(part, load_parts("offline"), progress=False)  # stops after step 2 (its checkpoint)
    resumed = train(part.replace(max_train_steps=4), load_parts("offline"), progress=False)
    assert resumed.info["resumed_from"].name == "step_000002"
    whole = train(c.replace(max_train_steps=4, output_dir=str(tmp_path / "whole")), load_parts("offline"),
                  progress=False)
    a, b = unet_file(resumed.output_dir), unet_file(whole.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == whole.losses


def test_plain_checkpoint_refused_by_an_ema_run(cfg, tmp_path):
    plain = cfg.replace(output_dir=str(tmp_path / "plain"), checkpointing_steps=2)
    train(plain, load_parts("offline"), progress=False)
    with pytest.raises(ResumeError, match="use_ema: False in the checkpoint, True now"):
        train(plain.replace(use_ema=True, max_train_steps=4), load_parts("offline"), progress=False)


def test_settings_planner_advice_and_cli():
    with pytest.raises(ConfigError, match="ema_decay=1.5"):
        TrainConfig(ema_decay=1.5).validate(check_paths=False)
    with pytest.raises(ConfigError, match="deepspeed_config with use_ema=True"):
        TrainConfig(use_ema=True, deepspeed_config="ds.json", checkpointing_steps=0).validate(check_paths=False)
    sd = TrainConfig(model="sd15", mixed_precision="fp16")
    plain, ema = planner.plan(sd), planner.plan(dataclasses.replace(sd, use_ema=True))
    extra = [b for what, b in ema.rows if what.startswith("EMA")]
    assert extra == [4 * sd15.PARAMS["unet"]] and not any(w.startswith("EMA") for w, _ in plain.rows)
    assert ema.allocated - plain.allocated == 4 * sd15.PARAMS["unet"]  # one fp32 copy of the UNet: 3.2 GiB
    lora = planner.plan(dataclasses.replace(sd, method="lora", use_ema=True))
    assert [b for w, b in lora.rows if w.startswith("EMA")][0] < 2**24  # only the adapters are averaged
    advice = remedies(dataclasses.replace(sd, use_ema=True))
    assert any(c.settings == {"use_ema": False} and not c.automatic for c in advice)
    cli_cfg, _, given = build_config(_parser().parse_args(["train", "--use_ema", "true", "--ema_decay", "0.999"]))
    assert (cli_cfg.use_ema, cli_cfg.ema_decay) == (True, 0.999) and {"use_ema", "ema_decay"} <= given


@pytest.mark.parametrize("method", ["lora", "textual_inversion"])
def test_lora_and_ti_save_their_average(cfg, parts, method):
    """Only what the method trains is averaged: LoRA's adapters; TI's embedding, whose other rows stay exact."""
    n_old = len(parts.tokenizer)
    emb0 = parts.text_encoder.get_input_embeddings().weight.detach().clone()
    extra = dict(instance_prompt="a photo of <zwx>", learning_rate=5e-2) if method == "textual_inversion" else {}
    r = train(cfg.replace(method=method, use_ema=True, ema_decay=0.5, checkpointing_steps=2, **extra), parts,
              progress=False)
    ckpt = r.output_dir / "checkpoints" / "step_000002"
    average, weights = (load_file(ckpt / f"{k}-00001.safetensors") for k in ("ema", "weights"))
    assert sorted(average) == sorted(f"ema.{k}" for k in weights)  # exactly the trained tensors
    assert any(not torch.equal(average[f"ema.{k}"], w) for k, w in weights.items())  # the average is not the raw
    live = dict(r.parts.unet.named_parameters(prefix="unet")) | dict(r.parts.text_encoder.named_parameters(
        prefix="text_encoder"))
    assert all(torch.equal(live[k.removeprefix("ema.")].detach(), v) for k, v in average.items())  # the result holds it
    if method == "textual_inversion":
        emb = r.parts.text_encoder.get_input_embeddings().weight.detach()
        assert torch.equal(emb[:n_old], emb0[:n_old])  # the average of rows put back every step is them, bit for bit
        assert torch.equal(load_file(r.saved)["<zwx>"][0], emb[n_old])  # the saved vector is the average
