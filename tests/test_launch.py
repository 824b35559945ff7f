"""nbkit.training.launch: the Accelerator's DDP options, DeepSpeed's refusals, and `launch.notebook` (new processes,
any kernel)."""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from nbkit import ConfigError, TrainConfig, TrainResult, cli, load_parts
from nbkit.training import accel, launch, manifest, presets


def test_ddp_keeps_gradients_in_its_buckets(cfg, monkeypatch):
    from accelerate.utils import DistributedDataParallelKwargs

    acc = accel.make_accelerator(cfg, "no", cpu=True)
    assert acc.ddp_handler.gradient_as_bucket_view is True and acc.ddp_handler.find_unused_parameters is False
    assert acc.ddp_handler.to_kwargs() == {"gradient_as_bucket_view": True}  # what DDP(...) is given
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: kw)  # what a 2-process run would be given
    monkeypatch.setenv("WORLD_SIZE", "2")
    for steps, unused in ((None, False), (10, True)):  # the text encoder stops part-way: DDP must not wait for it
        kw = accel.make_accelerator(dataclasses.replace(cfg, text_encoder_steps=steps), "no", cpu=True)
        ddp = [h for h in kw["kwargs_handlers"] if isinstance(h, DistributedDataParallelKwargs)]
        assert len(ddp) == 1 and ddp[0].gradient_as_bucket_view is True and ddp[0].find_unused_parameters is unused


def test_deepspeed_refuses_what_it_cannot_train_before_asking_for_deepspeed(cfg):
    ds = str(presets.deepspeed_config_path())
    lora_te = dataclasses.replace(cfg, method="lora", lora_text_encoder=True, deepspeed_config=ds)
    ti = dataclasses.replace(cfg, method="textual_inversion", instance_prompt="a photo of <zwx>", deepspeed_config=ds)
    for c, says in ((lora_te, r"lora_text_encoder=True.*Set lora_text_encoder=False"),
                    (ti, r"textual_inversion.*fits 8 GB without DeepSpeed.*PRESET='8gb'")):
        with pytest.raises(ConfigError, match=says):
            c.validate()
        with pytest.raises(ConfigError, match=says):  # the settings error, not "DeepSpeed is not installed"
            accel.deepspeed_plugin(c)
    for fine in (dataclasses.replace(lora_te, lora_text_encoder=False, checkpointing_steps=0),
                 dataclasses.replace(ti, deepspeed_config=""),
                 dataclasses.replace(lora_te, deepspeed_config="")):
        fine.validate()
    with pytest.raises(ConfigError, match="train_text_encoder=True: DeepSpeed here trains the UNet only"):
        dataclasses.replace(cfg, train_text_encoder=True, deepspeed_config=ds).validate()
    # ZeRO's optimizer state only pickles: refused up front, not at the first checkpoint 200 steps in
    with pytest.raises(ConfigError, match="checkpointing_steps=200: DeepSpeed's optimizer state"):
        dataclasses.replace(cfg, deepspeed_config=ds, checkpointing_steps=200).validate()
    assert presets.settings("8gb-deepspeed", presets.GPUS["RTX3070-8GB"])["checkpointing_steps"] == 0


def test_a_failed_launch_says_why_with_its_last_lines(capsys):
    script = "import sys\nfor i in range(100): print('line', i)\nprint('50%', end='\\r')\nsys.exit('boom: out of disk')"
    with pytest.raises(launch.LaunchError, match=r"(?s)exit code 1.*line 99\n50%\nboom: out of disk") as err:
        launch._stream([sys.executable, "-c", script], dict(os.environ))
    assert "line 0\n" not in str(err.value)  # the tail, not everything
    out = capsys.readouterr().out
    assert "line 0\nline 1\n" in out and "line 99\n50%\rboom" in out  # streamed as it came; progress bars redraw


def test_notebook_with_one_process_trains_in_this_kernel(cfg):
    r = launch.notebook(dataclasses.replace(cfg, max_train_steps=1), num_processes=1)
    assert isinstance(r, TrainResult) and len(r.losses) == 1 and r.info["processes"] == 1
    with pytest.raises(ValueError, match="num_processes=0: must be at least 1"):
        launch.notebook(cfg, num_processes=0)


def test_notebook_trains_two_cpu_processes_in_new_processes(cfg, capsys):
    """Kaggle's 2x T4 path, on the CPU: accelerate launch, torchrun, DDP over gloo, whatever this kernel holds."""
    from accelerate.state import AcceleratorState

    accel.make_accelerator(cfg, "no", cpu=True)  # as after an nbkit.train here (notebook_launcher refused then)
    assert AcceleratorState._shared_state
    c = dataclasses.replace(cfg, max_train_steps=2, checkpointing_steps=0)
    out = launch.notebook(c, num_processes=2, cpu=True)
    printed = capsys.readouterr().out
    assert out == Path(c.output_dir)
    assert "effective batch 2 = 1 per step x 1 accumulation x 2 processes" in printed
    assert TrainConfig(**cli.read_config_file(out / launch.CONFIG_FILE)) == c  # the run's settings, all of them
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 2 and all(math.isfinite(row["loss"]) for row in losses)
    assert manifest.read(out)["status"] == "finished"
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    base = load_parts("offline").unet.state_dict()
    trained = pipe.unet.state_dict()
    assert all(v.isfinite().all() for v in trained.values())
    assert any(not torch.equal(base[k], trained[k]) for k in base)  # it trained


def test_deepspeed_command_writes_a_run_the_cli_reads_and_plans_for_8gb(tmp_path, capsys):
    """The 8 GB recipe of notebook 04: the run file holds the run's own settings (not the memory ones, which the
    8gb-deepspeed preset sets at launch), the CLI reads it back to the same run, and plans it to fit 8 GB."""
    import argparse
    import shlex

    from nbkit.memory import tuning

    cfg = tuning.preview(TrainConfig(instance_dir="photos", instance_prompt="a photo of zwx dog", identifier="zwx",
                                     max_train_steps=400, learning_rate=2e-6, output_dir=str(tmp_path / "out")),
                         "RTX3070-8GB", preset="8gb-deepspeed").config
    file, line = launch.deepspeed_command(cfg, tmp_path / "run.json")
    words = shlex.split(line)
    assert words[:4] == ["accelerate", "launch", "--config_file", "configs/accelerate/deepspeed_zero2_offload.yaml"]
    assert words[4:] == ["-m", "nbkit", "train", "--config", str(file), "--preset", "8gb-deepspeed"]
    written = json.loads(file.read_text())
    assert written["model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the planner's "sd15", loadable
    assert written["output_dir"] == str(tmp_path / "out")
    assert not {"deepspeed_config", "gradient_checkpointing", "mixed_precision", "use_8bit_adam"} & set(written)
    read, preset, given = cli.build_config(argparse.Namespace(config=str(file), preset="8gb-deepspeed"))
    assert preset == "8gb-deepspeed" and given == set(written)
    assert dataclasses.replace(read, model="sd15") == dataclasses.replace(cfg, **{
        k: getattr(read, k) for k in ("deepspeed_config", "gradient_checkpointing", "mixed_precision",
                                      "use_8bit_adam", "optimizer_in_backward", "cache_latents",
                                      "gradient_accumulation_steps", "checkpointing_steps")})
    assert cli.main(["plan", "--config", str(file), "--preset", "8gb-deepspeed", "--gpu-gb", "7.79"]) == 0  # fits
    assert "DeepSpeed" in capsys.readouterr().out
    with pytest.raises(ValueError, match="UNet only"):
        launch.deepspeed_command(dataclasses.replace(cfg, train_text_encoder=True), tmp_path / "te.json")


def test_step_source_is_the_loops_own_loss():
    """Notebook 01's look inside: the lines shown are the loop's, numbered as in its file; 02's are the prior term."""
    import nbkit as nb
    from nbkit.training import loop

    text = nb.step_source()
    head, *body = text.splitlines()
    assert head.startswith("nbkit/training/loop.py, _loss(), lines ")
    file = Path(loop.__file__).read_text().splitlines()
    for row in body:
        n, code = row.split(" | ", 1)
        assert file[int(n) - 1].rstrip() == code
    joined = "\n".join(body)
    assert all(w in joined for w in ("torch.randn(", "torch.randint(", "add_noise(", "o.unet(", "mse_loss("))
    prior = nb.step_source("prior")
    assert "prior_loss_weight" in prior and "randint" not in prior and len(prior.splitlines()) <= 8
    with pytest.raises(ValueError, match="choose one of"):
        nb.step_source("everything")
