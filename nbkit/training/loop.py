"""The one training loop. Every method (DreamBooth, +text encoder, LoRA, TI) and prior preservation go through it.

`_train` reads top to bottom as the run's stages, each a function of at most a screen: `_setup` (settings and
folders checked first: writable, the checkpoint to resume from; precision; the accelerator) -> `_model` (which
parameters train, frozen weights in half precision, the loss terms) -> the scorer (eval_steps) -> the data
(nbkit.training.batches: latents and prompt embeddings cached once) -> `_optimizer` -> `_resume` -> `_steps` (each
step an `_update` guarded against out of memory and non-finite losses, built from `_loss`; then `_after_step`:
validation pictures, scores and the best model (nbkit.scores.tracking), checkpoints) -> `_save`. With use_ema,
nbkit.training.ema's average of the trained weights is stepped after each update and is what is sampled, scored and
saved; training continues on the raw weights.

A step is a pure function of (seed, step): the batch, the noise and the timesteps are drawn from generators
seeded by the step, so runs are repeatable, and a run resumed from a checkpoint (nbkit.training.checkpoint) ends with
the same weights as one never stopped. run_manifest.json (nbkit.training.manifest) records how each run was made;
however a run ends, nbkit.training.placement puts the parts back as it found them. What differs between models
(SDXL's two text encoders, pooled embeddings and size conditioning, its fp32 VAE) is the parts' interface
(nbkit.models.base): the loop asks the parts, it never branches on the architecture.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nbkit.config import TrainConfig
from nbkit.env import runtime
from nbkit.models.parts import SDParts, load_parts, pipeline
from nbkit.sample.sampling import generate, grid
from nbkit.scores import tracking
from nbkit.training import accel, batches, checkpoint, ema, guards, manifest, methods, optim, placement, trackers

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass
class TrainResult:
    """What a run produced: where, the losses, the validation grids, and the trained parts (in memory)."""

    output_dir: Path
    saved: Path  # the model folder / LoRA file / embedding file
    losses: list[float]
    validation: dict[int, Path]  # step -> grid image
    seconds: float
    parts: SDParts
    method: methods.Method
    config: TrainConfig
    info: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)  # metrics.json: one row of scores per evaluation (eval_steps)
    best: dict | None = None  # the best-scoring step: its scores and, with keep_best, where it was saved

    def pipeline(self, scheduler: str = "ddim"):
        """A sampling pipeline over the trained parts."""
        return pipeline(self.parts, scheduler)


def train(cfg: TrainConfig, parts: SDParts | None = None, progress: bool = True) -> TrainResult:
    """Fine-tune with `cfg`; return the result (also written to cfg.output_dir).

    With cfg.resume='auto' (the default) a run whose output folder holds a complete checkpoint continues from
    it, to the same weights as if it had never stopped. However the run ends, run_manifest.json says how; when
    the GPU runs out of memory, the memory the run held is freed before the error reaches you.
    """
    run, live = manifest.Run(), placement.Live()
    try:
        return _train(cfg, parts, progress, run, live)
    except BaseException as err:
        run.stopped(err)
        live.clean_up()
        if isinstance(err, guards.OutOfMemory):
            guards.release(err)  # the loop's frames hold the optimizer state and activations: let them go
            raise err  # noqa: B904 - a fresh traceback that holds none of them
        raise


def _train(cfg: TrainConfig, parts: SDParts | None, progress: bool, run: manifest.Run,
           live: placement.Live) -> TrainResult:
    """The stages of a run, in order; each is a function below."""
    s = _setup(cfg, run)  # settings, folders, the checkpoint to resume from, precision, accelerator
    live.trackers = s.trackers  # TensorBoard/wandb flushed however the run ends
    parts, method, obj = _model(cfg, parts, s, live)  # which parameters train, where the parts sit, the loss terms
    s.tracker = (tracking.Tracker.for_training(cfg, parts, method, s.out)  # its models load now: fail early
                 if cfg.eval_steps and s.accelerator.is_main_process else None)
    b = batches.prepare(cfg, parts, method, s.accelerator, s.weight_dtype)  # latents and embeddings, cached once
    o = _optimizer(cfg, parts, method, s, live)  # optimizer, LR schedule, accelerate's wrapping
    state = _resume(cfg, parts, method, s, b, o, run)  # weights, moments, schedule, scaler, RNGs: as they were
    _steps(cfg, parts, method, s, b, o, obj, state, run, progress)
    return _save(cfg, parts, method, s, o, obj, state, run)


@dataclass
class _Setup:
    """What a run is, decided before anything is loaded."""

    t0: float
    rt: runtime.Runtime
    precision: str
    weight_dtype: torch.dtype  # frozen weights (fp16 on a T4); trained ones stay fp32
    accelerator: object
    in_backward: bool
    ckpts: checkpoint.Checkpoints
    out: Path
    resume_from: Path | None
    trackers: trackers.Trackers  # TensorBoard, wandb, ... (report_to)
    tracker: object = None  # nbkit.scores.tracking.Tracker with eval_steps (main process)
    resumable: checkpoint.Resumable | None = None  # what a checkpoint saves and restores
    ema: ema.Ema | None = None  # use_ema: the average of the trained weights (saved, sampled and scored)
    fingerprint: dict | None = None  # the pictures and prompts a resumed run must find again
    scales: list = field(default_factory=list)  # fp16: the loss scale after each step
    skipped: list = field(default_factory=list)  # fp16: steps whose gradients overflowed (not applied)
    step_seconds: list = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def _setup(cfg: TrainConfig, run: manifest.Run) -> _Setup:
    from accelerate.utils import set_seed

    cfg.validate()
    t0 = time.perf_counter()
    ckpts = checkpoint.Checkpoints(checkpoint.folder(cfg), cfg.checkpoints_total_limit)
    out = guards.writable_folders(cfg, ckpts.root)  # output, checkpoint and class-image folders
    resume_from = ckpts.resume_point(cfg)  # None, or the complete checkpoint to continue (same settings)
    rt = runtime.detect()
    precision = runtime.resolve_precision(cfg.mixed_precision, rt)
    accelerator = accel.make_accelerator(cfg, precision, cpu=rt.device == "cpu")
    if rt.rehearsal and precision == "fp16":
        placement.rehearse_t4(accelerator)
    set_seed(cfg.seed)  # the global RNGs too: LoRA's initial adapters, for one, are drawn from them
    run.start(out, cfg.to_dict(), {"runtime": rt.describe(), "device": str(accelerator.device), "precision": precision})
    procs = accelerator.num_processes
    in_backward, why_not = optim.in_backward_active(cfg, procs)
    if cfg.optimizer_in_backward and not in_backward:
        print(f"optimizer_in_backward: using the normal optimizer instead, because of {why_not}.")
    if accelerator.is_main_process:
        print(accel.effective_batch(cfg, procs)[1])
    return _Setup(t0, rt, precision, DTYPES[precision], accelerator, in_backward, ckpts, out, resume_from,
                  trackers.Trackers(accelerator, cfg))


@dataclass
class _Objective:
    """What a step's loss is made of, as the model was pretrained ("auto" settings; SD 1.5: neither extra)."""

    prediction: str  # "epsilon" or "v_prediction"
    noise_offset: float
    snr_gamma: float


def _model(cfg: TrainConfig, parts: SDParts | None, s: _Setup, live: placement.Live):
    half = methods.frozen_networks(cfg) if s.device.type == "cuda" and s.weight_dtype != torch.float32 else ()
    parts = parts or load_parts(cfg.model, vae=cfg.vae or None, half=half, dtype=s.weight_dtype)  # frozen: half
    method = methods.setup(cfg, parts)
    live.parts, live.params, live.device = parts, method.params, s.device
    live.modes = {n: m.training for n, m in parts.networks.items()}
    for name, module in parts.networks.items():
        placement.place(module, s.device,
                        torch.float32 if name in method.full_precision else parts.frozen_dtype(name, s.weight_dtype))
    if cfg.gradient_checkpointing:
        # the UNet's activations dominate even when it is frozen (TI: gradients flow through it to the embedding)
        parts.unet.enable_gradient_checkpointing()
        for te in parts.text_encoders.values() if method.trains_text_encoder else ():
            te.gradient_checkpointing_enable()
    pre = parts.pretraining
    obj = _Objective(parts.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type,
                     pre.get("offset_noise", 0.0) if cfg.noise_offset == "auto" else cfg.noise_offset,
                     pre.get("snr_gamma", 0.0) if cfg.snr_gamma == "auto" else cfg.snr_gamma)
    start = checkpoint.step_of(s.resume_from) if s.resume_from else 0
    guards.check_disk(guards.run_disk_needs(cfg, parts, method, len(s.ckpts.complete()), start,  # before class images
                                            cfg.use_8bit_adam and s.rt.gpu_path))
    return parts, method, obj


@dataclass
class _Opt:
    """The optimizer, its LR schedule, and the trained modules as accelerate wrapped them."""

    optimizer: object
    lr_sched: object
    wrapped: dict[str, torch.nn.Module]
    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # by name, wrapped where they train
    unet_input: torch.dtype  # DeepSpeed keeps the UNet itself in half precision (no autocast): inputs must match


def _optimizer(cfg: TrainConfig, parts: SDParts, method, s: _Setup, live: placement.Live) -> _Opt:
    from diffusers.optimization import get_scheduler

    # the rehearsal makes the optimizer a T4 would get (8-bit AdamW runs on a CPU too)
    optimizer = optim.make_optimizer(method.params, cfg, "cuda" if s.rt.gpu_path else s.rt.device,
                                     in_backward=s.in_backward, scaler=s.accelerator.scaler,
                                     offloaded=bool(cfg.deepspeed_config))
    live.optimizer = optimizer
    lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=cfg.max_train_steps)
    trainable = method.trainable_modules(parts)
    # the in-backward optimizer steps inside backward: accelerate must not wrap it (nothing to step after)
    prepared = s.accelerator.prepare(*trainable.values(), *([] if s.in_backward else [optimizer]))
    prepared = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
    wrapped = dict(zip(trainable, prepared))
    for m in wrapped.values():
        m.train()
    return _Opt(optimizer if s.in_backward else prepared[-1], lr_sched, wrapped, wrapped.get("unet", parts.unet),
                {n: wrapped.get(n, m) for n, m in parts.text_encoders.items()},
                s.weight_dtype if cfg.deepspeed_config else torch.float32)


def _loss(cfg: TrainConfig, parts: SDParts, s: _Setup, b: batches.Batches, o: _Opt, obj: _Objective,
          micro: int, te_trains: bool) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-step: noise a batch at random timesteps, predict the noise (or velocity) from the
    prompts, mean squared error; with prior preservation the class pictures' error is a second, weighted term."""
    from diffusers.training_utils import compute_snr  # imports bitsandbytes: not at `import nbkit`

    device, sched = s.device, parts.noise_scheduler
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro)
    latents, prompts, sizes = b.draw(micro, gen)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen).to(device)
    if obj.noise_offset:  # a per-image, per-channel shift: lets the model change a picture's mean colour
        noise = noise + obj.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, t)
    emb = b.embeddings(prompts, o.text_encoders, te_trains)  # and the model's extra UNet inputs (SDXL's):
    extra = parts.unet_kwargs(emb, sizes, o.unet_input)
    target = noise if obj.prediction == "epsilon" else sched.get_velocity(latents, noise, t)
    with s.accelerator.autocast():
        pred = o.unet(noisy.to(o.unet_input), t, emb.hidden.to(o.unet_input), **extra).sample.float()
    per_image = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if obj.snr_gamma:  # min-SNR weighting (Hang et al. 2023), as diffusers' examples do it
        snr = compute_snr(sched, t)
        per_image = per_image * torch.clamp(snr, max=obj.snr_gamma) / (snr if obj.prediction == "epsilon" else snr + 1)
    if b.prior:
        inst_loss, prior_loss = (part.mean() for part in per_image.chunk(2))
        return (inst_loss + cfg.prior_loss_weight * prior_loss,
                {"instance": inst_loss.item(), "prior": prior_loss.item()})
    return per_image.mean(), {}


def _resume(cfg, parts, method, s: _Setup, b: batches.Batches, o: _Opt, run: manifest.Run) -> checkpoint.Progress:
    named = checkpoint.trainable_params(parts, method)
    s.ema = ema.make(cfg, named)  # from the weights as they start; a checkpoint's average replaces it
    s.resumable = checkpoint.Resumable(named, o.optimizer, o.lr_sched, s.accelerator.scaler, s.ema)
    s.fingerprint = b.fingerprint()
    state = checkpoint.Progress()
    if s.resume_from:
        state = checkpoint.resume(s.resume_from, s.resumable, cfg, s.fingerprint, s.out)
        run.update(resumed_from=str(s.resume_from), resumed_at_step=state.step, steps_done=state.step)
    if s.tracker:
        s.tracker.restore(state.metrics, state.best, fresh=not s.resume_from)
        if not s.resume_from:  # the untrained model: the baseline of every curve
            with _sampling(cfg, parts, s.device, s.precision, s.weight_dtype) as pipe:
                s.tracker.update(0, pipe)
            s.trackers.scores(s.tracker.rows[-1])
    return state


def _steps(cfg, parts, method, s: _Setup, b, o: _Opt, obj, state, run: manifest.Run, progress: bool) -> None:
    """The loop: one optimizer update per step (accumulated over micro-steps), then what is due after it."""
    from tqdm.auto import tqdm

    advice = guards.training_advice(cfg, s.rt)
    bar = tqdm(range(state.step, cfg.max_train_steps), initial=state.step, total=cfg.max_train_steps,
               desc=f"{method.name}", disable=not progress)
    for step in bar:
        t_step = time.perf_counter()
        te_trains = method.trains_text_encoder and (cfg.text_encoder_steps is None or step < cfg.text_encoder_steps)
        for te in parts.text_encoders.values() if method.trains_text_encoder and not te_trains else ():
            te.requires_grad_(False)  # AdamW skips parameters without gradients
        with guards.out_of_memory("the training step", advice):
            total, terms = _update(cfg, parts, method, s, b, o, obj, step, te_trains)
        s.step_seconds.append(time.perf_counter() - t_step)
        state.log.append({"step": step + 1, "loss": total, "lr": o.lr_sched.get_last_lr()[0], **terms})
        s.trackers.step(state.log[-1])
        bar.set_postfix(loss=f"{total:.4f}")
        run.steps_done = step + 1
        _after_step(cfg, parts, method, s, state, run, step + 1)
    bar.close()
    if s.in_backward:
        o.optimizer.close()  # the parts outlive this run: no stale optimizer may step them later


def _update(cfg, parts, method, s: _Setup, b, o: _Opt, obj, step: int, te_trains: bool) -> tuple[float, dict]:
    """One optimizer update: forward and backward over the accumulated micro-steps, then the step itself."""
    acc, acc_ = cfg.gradient_accumulation_steps, s.accelerator
    procs, rank = acc_.num_processes, acc_.process_index
    total = 0.0
    for k in range(acc):
        with contextlib.ExitStack() as ctx:
            if k != acc - 1:  # no gradient sync between processes before the last micro-step
                for m in o.wrapped.values():
                    ctx.enter_context(acc_.no_sync(m))
            # each process draws its own samples (with one process: micro-step step * acc + k)
            loss, terms = _loss(cfg, parts, s, b, o, obj, (step * acc + k) * procs + rank, te_trains)
            acc_.backward(loss / acc)
        total += loss.item() / acc
    if not math.isfinite(total):  # stop before the update: the last checkpoint stays the last good one
        raise guards.non_finite_loss(total, step, s.ckpts.latest(), s.precision, parts.nan_causes(s.precision))
    if cfg.max_grad_norm > 0:
        acc_.clip_grad_norm_(method.params, cfg.max_grad_norm)
    overflowed = getattr(o.optimizer, "skipped", 0)  # the in-backward optimizer counts its own
    o.optimizer.step()
    if acc_.scaler is not None:  # a step whose gradients overflowed was skipped, not applied; the scale halved
        s.scales.append(acc_.scaler.get_scale())
        if acc_.optimizer_step_was_skipped or getattr(o.optimizer, "skipped", 0) > overflowed:
            s.skipped.append(step + 1)
    o.lr_sched.step()
    o.optimizer.zero_grad(set_to_none=True)
    method.after_step()
    if s.ema:  # after the method's own fix-ups (TI's untouched rows put back)
        s.ema.step()
    return total, terms


def _after_step(cfg, parts, method, s: _Setup, state, run: manifest.Run, done: int) -> None:
    """What is due after step `done`: validation pictures, scores (best model, overfit warning), a checkpoint."""
    main, last = s.accelerator.is_main_process, done == cfg.max_train_steps
    show = main and cfg.validation_prompts and cfg.validation_steps and (done % cfg.validation_steps == 0 or last)
    score = s.tracker and (done % cfg.eval_steps == 0 or last)
    with ema.applied(s.ema if show or score else None):  # pictures and scores of the average; then the raw weights
        if show:
            state.validation[done] = _validate(cfg, parts, s.out, done, s.device, s.precision, s.weight_dtype)
            s.trackers.image(state.validation[done], done)
        if score:
            with _sampling(cfg, parts, s.device, s.precision, s.weight_dtype) as pipe:
                s.tracker.update(done, pipe)  # metrics.json, best/, the overfit warning
            s.trackers.scores(s.tracker.rows[-1] if s.tracker.rows else None)
    if main and cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0:
        saved_at = s.ckpts.save(done, s.resumable, {
            "method": method.name, "config": cfg.to_dict(), "data": s.fingerprint, "log": state.log,
            "validation": {k: p.relative_to(s.out).as_posix() for k, p in state.validation.items()},
            **(s.tracker.state() if s.tracker else {})})
        (s.out / "losses.json").write_text(json.dumps(state.log))
        run.update(steps_done=done, last_checkpoint=str(saved_at))


def _save(cfg, parts, method, s: _Setup, o: _Opt, obj: _Objective, state, run: manifest.Run) -> TrainResult:
    """The trained parts as plain modules again, the result written, the manifest finished, the run's facts."""
    if s.ema:
        s.ema.copy_in()  # the average is what the run saves and returns
    for m in (parts.unet, *parts.text_encoders.values()):
        m.eval()
    parts.unet = placement.unprepare(o.unet)
    if cfg.deepspeed_config:
        placement.deepspeed_master_weights(parts.unet)
    for name, te in o.text_encoders.items():
        setattr(parts, name, placement.unprepare(te))
    parts.vae.to(s.device)
    out, procs = s.out, s.accelerator.num_processes
    saved = method.save(parts, out / "model") if s.accelerator.is_main_process else out / "model"
    (out / "losses.json").write_text(json.dumps(state.log))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    run.finish("finished", steps_done=cfg.max_train_steps, saved=str(saved))
    s.trackers.end()
    if s.tracker:
        print(s.tracker.summary())
    opt = o.optimizer
    info = {"precision": s.precision, "device": str(s.device), "prediction_type": obj.prediction,
            "noise_offset": obj.noise_offset, "snr_gamma": obj.snr_gamma, "runtime": s.rt.describe(),
            "resumed_from": state.resumed_from, "manifest": run.path,
            "optimizer": getattr(opt, "name", None) or type(getattr(opt, "optimizer", opt)).__name__,
            "optimizer_in_backward": s.in_backward, "processes": procs,
            "effective_batch": accel.effective_batch(cfg, procs)[0], "step_seconds": s.step_seconds,
            "grad_scales": s.scales, "skipped_steps": s.skipped,
            "cuda_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if s.device.type == "cuda" else None}
    return TrainResult(out, saved, [row["loss"] for row in state.log], state.validation, time.perf_counter() - s.t0,
                       parts, method, cfg, info, s.tracker.rows if s.tracker else [],
                       s.tracker.best if s.tracker else None)


@contextlib.contextmanager
def _sampling(cfg, parts, device, precision, weight_dtype):
    """A pipeline over the parts in training, for samples mid-run: VAE on the device, eval mode, autocast;
    all put back afterwards."""
    vae_device = next(parts.vae.parameters()).device
    parts.vae.to(device)
    nets = {n: m for n, m in parts.networks.items() if n != "vae"}
    was_training = {n: m.training for n, m in nets.items()}
    for m in nets.values():
        m.eval()
    try:
        # no autocast weight cache: it would keep a half copy of every fp32 trained weight (1.6 GiB for SD 1.5's
        # UNet) for the whole sampling loop
        with torch.no_grad(), torch.autocast(device.type, dtype=weight_dtype, enabled=precision != "no",
                                             cache_enabled=False):
            yield pipeline(parts, cfg.sample_scheduler)
    finally:
        for n, m in nets.items():
            m.train(was_training[n])
        parts.vae.to(vae_device)


def _validate(cfg, parts, out, step, device, precision, weight_dtype) -> Path:
    """Sample the validation prompts with fixed seeds; save a grid (one row per prompt)."""
    with _sampling(cfg, parts, device, precision, weight_dtype) as pipe:
        images = generate(pipe, cfg.validation_prompts, seeds=list(range(cfg.num_validation_images)),
                          steps=cfg.sample_steps, guidance=cfg.guidance_scale, size=cfg.resolution)
    path = out / "validation" / f"step_{step:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, rows=len(cfg.validation_prompts), cols=cfg.num_validation_images).save(path)
    return path
