"""The memory planner: parameter counts of full-size SD 1.5 without a download, the accounting of each term,
the activation model against measurements (a real CPU run of the offline model; published SD 1.5 anchors)."""

import dataclasses
import warnings

import pytest
import torch

from nbkit import TrainConfig, load_parts, train
from nbkit.memory import actmodel, memtrace, planner
from nbkit.models import sd15
from nbkit.models.offline import OFFLINE_SPEC

GiB = 2**30
SD15 = TrainConfig(model="sd15", mixed_precision="fp16")


def sd(**changes):
    return dataclasses.replace(SD15, **changes)  # no path checks: planning needs no pictures


def row(plan, prefix):
    return next(b for what, b in plan.rows if what.startswith(prefix))


def test_sd15_is_counted_from_its_configs_on_the_meta_device():
    arch = planner.arch_of("stable-diffusion-v1-5/stable-diffusion-v1-5")  # no download: SD 1.x ids map to the spec
    assert (arch.unet, arch.text_encoder, arch.vae) == tuple(sd15.PARAMS[k] for k in ("unet", "text_encoder", "vae"))
    assert arch.token_embedding == 49_408 * 768 and arch.vae_factor == 8
    assert arch.lora_per_rank_unet * 4 == 797_184  # rank-4 LoRA on SD 1.5's attention: the usual 3.2 MB file
    assert arch.largest["text_encoder"] == 49_408 * 768
    assert arch.calibration_source.startswith("calibrated") and arch.name == "sd15"


def test_each_term_follows_the_settings():
    n_unet, n_te = sd15.PARAMS["unet"], sd15.PARAMS["text_encoder"]
    p = planner.plan(sd(use_8bit_adam=True), gpu_gb=15)
    assert row(p, "UNet weights (fp32, trained)") == 4 * n_unet
    assert row(p, "text encoder weights (fp16, frozen)") == 2 * n_te
    assert 2.0 * n_unet < row(p, "optimizer state (8-bit AdamW)") < 2.1 * n_unet
    assert row(p, "gradients (fp32)") == 4 * n_unet
    adam = planner.plan(sd(), gpu_gb=15)
    assert row(adam, "optimizer state (AdamW, fp32)") == 8 * n_unet
    te = planner.plan(sd(train_text_encoder=True), gpu_gb=15)
    assert row(te, "gradients (fp32)") == 4 * (n_unet + n_te)
    ib = planner.plan(sd(train_text_encoder=True, optimizer_in_backward=True,
                                   max_grad_norm=0.0), gpu_gb=15)
    assert row(ib, "gradients (optimizer in backward") == 4 * 49_408 * 768  # the largest parameter only
    fallback = planner.plan(sd(optimizer_in_backward=True), gpu_gb=15)
    assert row(fallback, "gradients (fp32)") == 4 * n_unet and "max_grad_norm" in fallback.notes[0]
    lora = planner.plan(sd(method="lora"), gpu_gb=15)
    assert row(lora, "UNet weights (fp16, frozen + fp32 LoRA)") == 2 * n_unet + 4 * 797_184
    assert row(lora, "gradients") == 4 * 797_184
    ti = planner.plan(sd(method="textual_inversion",
                                   instance_prompt="a photo of <zwx>"), gpu_gb=15)
    assert row(ti, "optimizer state") == 8 * 49_408 * 768 and row(ti, "UNet weights (fp16, frozen)") == 2 * n_unet
    no_cache = planner.plan(sd(cache_latents=False), gpu_gb=15)
    assert row(no_cache, "VAE weights") == 2 * sd15.PARAMS["vae"]
    assert p.allocated == sum(b for _, b in p.rows) and p.reserved > p.allocated and p.needed > p.reserved


def test_activations_grow_with_pixels_and_samples_and_shrink_with_checkpointing():
    base = sd(use_8bit_adam=True)

    def act(c):
        return row(planner.plan(c, gpu_gb=15), "activations")

    r = dataclasses.replace
    assert act(r(base, resolution=768)) > act(base)
    assert act(r(base, train_batch_size=2)) > act(base)
    assert act(r(base, with_prior_preservation=True, class_prompt="a photo of a dog", class_dir="c")) == \
        act(r(base, train_batch_size=2))  # prior preservation doubles the samples per step
    big = r(base, train_batch_size=4)
    assert act(r(big, gradient_checkpointing=True)) < act(big) / 2
    assert planner.plan(big, gpu_gb=15).reserved - planner.plan(r(big, gradient_checkpointing=True),
                                                                gpu_gb=15).reserved > 2 * GiB
    # accumulating: the next micro-step's forward pass runs while the summed gradients are held
    assert act(r(base, gradient_accumulation_steps=2)) > act(base) + GiB


# Published figures (2022-23 stacks with xformers, read from nvidia-smi: reserved + CUDA context, the planner's
# `needed`). Two planner constants were fitted to them (CUDA_WORKSPACE, ALLOCATOR_FRAGMENTATION): this checks
# that one model explains all of them; benchmarks/RESULTS.md checks it against this kit's own measured peaks.
ANCHORS = [
    # diffusers PR #2039: text encoder + 8-bit Adam + fp16 + xformers + checkpointing, batch 1, VAE on the GPU
    (dict(train_text_encoder=True, use_8bit_adam=True, gradient_checkpointing=True, cache_latents=False),
     11_124 / 1024),
    # the T4 table of the DreamBooth 16 GB recipe (UNet only, fp16; batch, accumulation, checkpointing, 8-bit)
    (dict(use_8bit_adam=True, gradient_checkpointing=True), 9.92),
    (dict(use_8bit_adam=True, gradient_checkpointing=True, train_batch_size=2), 10.4),
    (dict(use_8bit_adam=True), 11.17),
    (dict(use_8bit_adam=True, train_batch_size=2), 13.67),
    (dict(use_8bit_adam=True, gradient_checkpointing=True, gradient_accumulation_steps=2), 11.56),
    (dict(use_8bit_adam=True, gradient_accumulation_steps=2), 13.7),
    (dict(gradient_checkpointing=True), 15.79),
]


@pytest.mark.parametrize("settings,published", ANCHORS, ids=["pr2039-te", "t4-ckpt", "t4-ckpt-b2", "t4-b1", "t4-b2",
                                                             "t4-ckpt-acc2", "t4-acc2", "t4-adamw-ckpt"])
def test_planner_is_near_the_published_sd15_anchors(settings, published):
    p = planner.plan(sd(**settings), gpu_gb=15)
    assert abs(p.needed / GiB - published) / published < 0.12, (p.needed / GiB, published)


def test_fake_simulation_equals_a_real_run_on_the_small_model():
    for kind in ("unet", "lora"):
        fake = memtrace.simulate_step(OFFLINE_SPEC, kind, batch=1, latent=16, half=False, fake=True)
        real = memtrace.simulate_step(OFFLINE_SPEC, kind, batch=1, latent=16, half=False, fake=False)
        assert fake.forward_peak == real.forward_peak and fake.after == real.after
        assert abs(fake.backward_peak - real.backward_peak) <= 0.01 * real.backward_peak


@pytest.mark.parametrize("changes", [dict(train_batch_size=2), dict(method="lora"),
                                     dict(train_text_encoder=True, gradient_checkpointing=True)],
                         ids=["dreambooth-b2", "lora", "te-ckpt"])
def test_planner_matches_the_measured_peak_of_a_real_run(cfg, changes):
    """Every tensor a real training run allocates, counted by memtrace.LiveBytes from the start of training to
    saving (two steps: the second runs with the optimizer state in place), plus the weights, loaded before (the
    planner predicts the training peak; loading happens on the CPU before the model moves to the GPU, and
    diffusers' from_pretrained may build a throw-away initialisation of the UNet on the way)."""
    c = cfg.replace(max_train_steps=2, resolution=32, **changes)  # 32 px: also checks the pixel scaling
    tracker = memtrace.LiveBytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = load_parts("offline")
        with tracker:
            train(c, parts, progress=False)
    weights = sum(t.numel() * t.element_size() for m in (parts.unet, parts.text_encoder, parts.vae)
                  for name, t in [*m.named_parameters(), *m.named_buffers()]
                  if "lora" not in name)  # LoRA's adapters are made by torch operations: the tracker has them
    measured = tracker.peak + weights
    plan = planner.plan(c, "offline", device="cpu")
    vae = 4 * sum(p.numel() for p in parts.vae.parameters())  # on a CPU the "offloaded" VAE is still counted
    print(f"planned {plan.allocated + vae}, measured {measured}")
    assert abs(plan.allocated + vae - measured) / measured < 0.10, (plan.allocated + vae, measured)


def test_plan_shows_a_table_and_a_bar_chart():
    import matplotlib

    matplotlib.use("Agg")
    p = planner.plan(sd(train_text_encoder=True), gpu_gb=14.75)
    md = p.table()
    assert "| part | GiB |" in md and "optimizer state" in md and "needed" in md
    ax = p.bar_chart()
    assert len(ax.patches) == len(p.rows) + 1 and ax.lines  # the breakdown + slack, and the GPU's line
    assert "GiB" in str(p) and p._repr_markdown_().startswith("| part |")
    small = planner.plan(TrainConfig(resolution=64), "offline", device="cpu")
    assert small.unit[0] == "MiB" and small.fits and small.capacity is None


def test_unknown_models_are_refused_with_a_way_out(tmp_path):
    with pytest.raises(ValueError, match="Cannot plan for model"):
        planner.arch_of(str(tmp_path / "nothing"))


def test_advice_lists_savers_with_their_effect():
    advice = planner.advise(sd(train_text_encoder=True), gpu_gb=7.8)
    names = [set(c.settings) for c, _ in advice]
    assert {"use_8bit_adam"} in names and {"gradient_checkpointing"} in names
    eight, base = advice[0][1], planner.plan(sd(train_text_encoder=True), gpu_gb=7.8)
    assert eight.allocated < base.allocated - 4 * GiB  # AdamW fp32 -> 8-bit on 0.98 B parameters
    assert any(not c.automatic for c, _ in advice)  # LoRA / DeepSpeed / resolution: suggested, never automatic


# ------------------------------------------------------------------------------ CUDA autocast's fp32 norms
def test_cuda_autocast_norms_run_group_and_layer_norm_as_cuda_does():
    import torch.nn.functional as F

    gn, ln, lin = torch.nn.GroupNorm(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
    x, h = torch.randn(2, 8, 4, 4).bfloat16(), torch.randn(2, 8).bfloat16()
    original = F.group_norm
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gn(x).dtype == ln(h).dtype == torch.bfloat16  # CPU autocast: 16 bits (what the calibration saw)
        with memtrace.cuda_autocast_norms():
            assert gn(x).dtype == ln(h).dtype == torch.float32  # CUDA autocast's fp32 list
            assert lin(ln(h)).dtype == torch.bfloat16  # the op after casts back down: a second saved tensor
    assert F.group_norm is original


@pytest.mark.parametrize("which", ["sd15", "tiny"])
def test_cuda_norm_factor_is_what_a_trace_of_saved_tensors_measures(which):
    """The planner's constant against the saved tensors of a UNet's forward (torch's saved-tensor hooks) under
    CPU autocast, with the norms as CPU autocast runs them and as CUDA's does: SD 1.5 itself (fake tensors,
    512 px; what the constant was derived from), and a 1/10-width UNet of SD 1.5's layout (real tensors)."""
    config = sd15.configs()["unet"]
    if which == "tiny":
        config = dict(config, block_out_channels=(32, 64, 128, 128), cross_attention_dim=32)
    latent, fake, tolerance = (64, True, 0.005) if which == "sd15" else (32, False, 0.03)
    m = memtrace.cuda_norm_factor(config, latent, fake=fake)
    assert abs(m["factor"] - actmodel.CUDA_NORM_FACTOR) < tolerance, m
    assert 0.12 < m["norm_inputs"] < 0.22 and 0.12 < m["norm_outputs"] < 0.22, m  # ~17 % each (the comment)


def test_cuda_plans_count_the_fp32_norms():
    """Per sample, the CUDA plan's activations are the CPU-calibrated ones times CUDA_NORM_FACTOR."""
    def act(device, n, **changes):
        p = planner.plan(sd(method="lora", mixed_precision="bf16", train_batch_size=n, **changes), device=device,
                         bf16=True)
        return row(p, "activations"), p

    for changes in ({}, {"gradient_checkpointing": True}):  # checkpointed: the recomputing backward's part
        (c1, _), (c2, cpu) = act("cpu", 1, **changes), act("cpu", 2, **changes)
        (g1, _), (g2, gpu) = act("cuda", 1, **changes), act("cuda", 2, **changes)
        assert g2 - g1 == pytest.approx(actmodel.CUDA_NORM_FACTOR * (c2 - c1), rel=1e-6)
        assert any("CUDA_NORM_FACTOR" in n for n in gpu.notes) and not any("CUDA_NORM_FACTOR" in n for n in cpu.notes)
    fp32 = planner.plan(sd(mixed_precision="no"), device="cuda")  # no autocast: norms are fp32 as calibrated x2
    assert not any("CUDA_NORM_FACTOR" in n for n in fp32.notes)


# ----------------------------------------------------------------------------------------------------- DDP
T4_TE_PRIOR = dict(train_text_encoder=True, with_prior_preservation=True, class_prompt="a dog", class_dir="c",
                   use_8bit_adam=True)


@pytest.mark.parametrize("changes", [dict(T4_TE_PRIOR, gradient_checkpointing=True), dict(T4_TE_PRIOR),
                                     dict(use_8bit_adam=True, gradient_accumulation_steps=2), dict(method="lora")],
                         ids=["te-prior-ckpt", "te-prior", "accumulating", "lora"])
def test_ddp_adds_one_row_for_its_buckets(changes):
    one = planner.plan(sd(**changes), gpu_gb=14.75)
    two = planner.plan(sd(**changes), gpu_gb=14.75, num_processes=2)
    ddp = row(two, "DDP buckets")
    assert two.allocated - one.allocated == ddp and [r for r in two.rows if r[0] != two.rows[-2][0]] == one.rows
    assert any("gradient_as_bucket_view=True" in n for n in two.notes) and two.settings["num_processes"] == 2
    # the documented term: the step's peak with every gradient held from the start (memtrace's grads_held:
    # the calibration's H rows), minus what one process holds beyond its gradients (the activations row)
    cal, n = planner.arch_of("sd15").calibration, 2 if "with_prior_preservation" in changes else 1
    r = cal["configs"][actmodel.config_key(planner.kind_of(sd(**changes)), "gradient_checkpointing" in changes,
                                           False, True)]
    k, kf = actmodel.CUDA_NORM_FACTOR, 1 if "gradient_checkpointing" in changes else actmodel.CUDA_NORM_FACTOR
    held = max(r["F0"] + n * r["Fs"] * kf, r["H0"] + n * r["Hs"] * k)
    assert ddp == pytest.approx(held - row(one, "activations"), abs=2)
    grads = row(two, "gradients (fp32)")
    if changes.get("method") == "lora":
        assert ddp <= grads  # LoRA: the adapters' gradients are a few MB
    if "gradient_accumulation_steps" in changes:  # one process holds the summed gradients through forward too
        assert ddp < 0.1 * grads
    copy = planner.plan(sd(**changes), gpu_gb=14.75, num_processes=2, gradient_as_bucket_view=False)
    assert row(copy, "DDP buckets") == grads  # a second copy of every gradient
    assert copy.allocated - one.allocated == grads


def _measured_step(width: int, batch: int, ddp: bool | None = None, held: bool = False) -> dict:
    """Peaks of a small model's third training step, every tensor counted by memtrace.LiveBytes (weights not):
    plain (gradients freed by zero_grad), held (every gradient allocated before, as memtrace's grads_held), or
    wrapped in DDP (gradient_as_bucket_view=ddp)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width),
                                torch.nn.ReLU(), torch.nn.Linear(width, width))
    x = torch.randn(batch, width)
    if held:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    tracker = memtrace.LiveBytes()
    with tracker:
        net = model if ddp is None else torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=ddp)
        for _ in range(3):
            tracker.mark("forward")
            loss = net(x).square().mean()
            tracker.mark("backward")
            loss.backward()
            del loss
            for p in model.parameters():
                p.grad.zero_() if held else setattr(p, "grad", None)
    return {**tracker.phase_peaks, "peak": max(tracker.phase_peaks["forward"], tracker.phase_peaks["backward"])}


def test_ddp_memory_is_what_the_planner_counts(tmp_path):
    """A real DDP (gloo, one process) on a small model: its buckets hold the gradients through the whole step
    (zero_grad frees nothing), and its peak is the planner's gradients + activations + DDP rows, with the
    activations measured as the calibration measures them (memtrace's grads_held for DDP's backward)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this session")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for width, batch in ((512, 8), (128, 512)):  # weights-heavy (one process peaks at the end of backward),
            grads = 3 * (width * width + width) * 4  # and activation-heavy (it peaks early in backward)
            plain, held = _measured_step(width, batch), _measured_step(width, batch, held=True)
            single = max(plain["forward"] - grads, plain["backward"] - grads)  # the planner's activations row
            step = actmodel.Step(plain["forward"], plain["backward"] - grads, held["backward"], 1.0, 0.0, single)
            assert plain["peak"] == grads + single
            for view in (True, False):
                measured = _measured_step(width, batch, ddp=view)
                planned = grads + single + actmodel.ddp_buckets(step, grads, view)
                assert abs(measured["peak"] - planned) <= 0.01 * measured["peak"], (width, view, measured, planned)
            view, copy = _measured_step(width, batch, ddp=True), _measured_step(width, batch, ddp=False)
            if width == 512:  # the bucket view saves the second copy where gradients dominate
                assert copy["peak"] - view["peak"] > 0.5 * grads
    finally:
        dist.destroy_process_group()
