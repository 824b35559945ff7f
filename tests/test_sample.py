import numpy as np
import pytest

from nbkit import SCHEDULERS, generate, grid, pipeline, set_scheduler
from nbkit.sample.sampling import make_scheduler


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_makes_images_of_the_right_size(parts, name):
    pipe = pipeline(parts, name)
    images = generate(pipe, ["a photo of a red star"], seeds=[0, 1], steps=3, size=64)
    assert len(images) == 2 and all(im.size == (64, 64) for im in images)
    assert np.asarray(images[0]).std() > 0


def test_scheduler_swap_does_not_reload(parts):
    pipe = pipeline(parts, "pndm")
    unet = pipe.unet
    set_scheduler(pipe, "dpm++ 2m")
    assert pipe.unet is unet and pipe.scheduler.config.algorithm_type == "dpmsolver++"
    with pytest.raises(ValueError, match="choose one of"):
        make_scheduler("nope", pipe.scheduler.config)


def test_seed_fixes_the_image_independently_of_batching(parts):
    pipe = pipeline(parts, "ddim")
    a = generate(pipe, ["a star", "a circle"], seeds=[5], steps=3, batch_size=1)
    b = generate(pipe, ["a star", "a circle"], seeds=[5], steps=3, batch_size=4)
    # batched maths rounds differently on a CPU: equal up to a level or two of 255
    assert all(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 2 for x, y in zip(a, b))
    c = generate(pipe, ["a star"], seeds=[6], steps=3)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_grid_pads_to_rows_and_cols(parts):
    images = generate(pipeline(parts), ["a"], seeds=3, steps=2)
    assert grid(images, cols=2).size == (128, 128)
    assert grid(images).size == (192, 64)


def test_mixed_precision_parts_sample_under_autocast(parts):
    # after training, the trained UNet is fp32 while the frozen text encoder and VAE are in the low precision
    import torch

    ref = generate(pipeline(parts, "ddim"), ["a star"], seeds=[3], steps=2)[0]
    parts.text_encoder.to(torch.bfloat16)
    parts.vae.to(torch.bfloat16)
    got = generate(pipeline(parts, "ddim"), ["a star"], seeds=[3], steps=2)[0]
    assert got.size == ref.size and np.asarray(got).std() > 0
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(ref, dtype=int)).mean() < 8  # same picture, rounded


def test_ancestral_noise_comes_from_the_seed(parts):
    pipe = pipeline(parts, "euler_a")
    import torch

    a = generate(pipe, ["a star", "a circle"], seeds=[4], steps=3, batch_size=2)
    torch.manual_seed(123)  # the global RNG must not matter
    b = generate(pipe, ["a star", "a circle"], seeds=[4], steps=3, batch_size=1)
    assert all(np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 2 for x, y in zip(a, b))


def test_a_freshly_loaded_fp32_model_samples_in_the_gpus_half_precision(parts, monkeypatch):
    """'before' pictures: an all-fp32 pipeline on a T4 samples under fp16 autocast (pure fp32 is ~4x slower there);
    on a plain CPU it stays fp32; after training, LoRA's fp32 adapters in an fp16 UNet count as mixed."""
    import torch

    from nbkit.env import runtime
    from nbkit.models.parts import pipeline as make_pipe
    from nbkit.sample import sampling as sample

    pipe = make_pipe(parts, device=None)
    cpu = torch.device("cpu")
    monkeypatch.delenv(runtime.REHEARSAL_ENV, raising=False)
    assert not isinstance(sample._autocast(pipe, cpu), torch.autocast)
    monkeypatch.setenv(runtime.REHEARSAL_ENV, "1")  # a T4's decisions, on this CPU
    ctx = sample._autocast(pipe, cpu)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16
    monkeypatch.delenv(runtime.REHEARSAL_ENV)
    for m in (parts.unet, parts.text_encoder, parts.vae):
        m.to(torch.float16)  # every module's .dtype (its first parameter) says fp16 ...
    parts.unet.conv_out.weight.data = parts.unet.conv_out.weight.data.float()  # ... but one weight is fp32, as LoRA's
    ctx = sample._autocast(pipe, cpu)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "euler_karras", "unipc"])
def test_the_samplers_users_know_build_from_the_models_config_and_sample_finite_pictures(parts, name):
    """DPM++ 2M Karras, Euler Karras and UniPC: diffusers' own classes and options, from the offline model's
    scheduler config (its betas and prediction type), sampling a clean picture in a few steps."""
    import torch

    pipe = pipeline(parts, "pndm")
    config = pipe.scheduler.config
    sched = make_scheduler(name, config)
    assert type(sched).__name__ == {"dpmpp_2m_karras": "DPMSolverMultistepScheduler",
                                    "euler_karras": "EulerDiscreteScheduler",
                                    "unipc": "UniPCMultistepScheduler"}[name]
    assert sched.config.beta_schedule == config.beta_schedule and sched.config.prediction_type == config.prediction_type
    sched.set_timesteps(8)
    sigmas = np.asarray(sched.sigmas[:-1], dtype=np.float64)  # the last one is the final 0
    ramp = np.diff(sigmas ** (1 / 7))  # Karras et al.: sigma^(1/rho) evenly spaced, rho = 7
    karras = bool(np.allclose(ramp, ramp[0], rtol=1e-3))
    assert karras == name.endswith("_karras") and bool(sched.config.get("use_karras_sigmas")) == karras
    set_scheduler(pipe, name)
    out = pipe("a photo of a red star", num_inference_steps=4, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all() and out.std() > 0.01
