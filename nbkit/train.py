"""The one training loop. Every method (DreamBooth, +text encoder, LoRA, TI) and prior preservation go through it.

Read top to bottom: settings and folders (checked first: writable, enough disk) -> accelerator -> model ->
method -> scorer (eval_steps) -> data (latents and prompt embeddings cached once) -> optimizer -> resume from a
checkpoint -> steps (each guarded: out of memory, non-finite loss) -> validation samples -> scores, best model
and overfit warning (nbkit.tracking) -> checkpoints -> save.

A step is a pure function of (seed, step): the batch, the noise and the timesteps are drawn from generators
seeded by the step, so runs are repeatable, and a run resumed from a checkpoint (nbkit.checkpoint) ends with
the same weights as one never stopped. run_manifest.json (nbkit.manifest) records how each run was made.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, data, guards, launch, manifest, methods, optim, placement, runtime, tracking
from .config import TrainConfig
from .models import SDParts, load_parts, pipeline
from .optim import make_optimizer  # noqa: F401 - its home is nbkit.optim; kept importable from here
from .sample import generate, grid

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


def _precision(cfg: TrainConfig, rt: runtime.Runtime) -> str:
    p = rt.default_precision() if cfg.mixed_precision == "auto" else cfg.mixed_precision
    if p == "bf16" and rt.gpu_path and not rt.bf16:
        warnings.warn(f"{rt.gpu_name} has no bf16: using fp16 instead.")
        p = "fp16"
    if p == "fp16" and not rt.gpu_path:
        warnings.warn("fp16 mixed precision needs a CUDA GPU: training in fp32 on this device.")
        p = "no"
    return p


def _encode_prompts(parts: SDParts, prompts: list[str], device) -> torch.Tensor:
    ids = parts.tokenizer(prompts, padding="max_length", truncation=True, max_length=parts.tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)
    return parts.text_encoder(ids)[0]


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


def _train(cfg: TrainConfig, parts: SDParts | None, progress: bool, run: manifest.Run, live: placement.Live) -> TrainResult:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr  # imports bitsandbytes: not at `import nbkit`
    from tqdm.auto import tqdm

    # --- settings, folders and the checkpoint to resume from: checked before anything is loaded
    cfg.validate()
    t0 = time.perf_counter()
    ckpts = checkpoint.Checkpoints(checkpoint.folder(cfg), cfg.checkpoints_total_limit)
    out = guards.writable_folders(cfg, ckpts.root)  # output, checkpoint and class-image folders
    resume_from = ckpts.resume_point(cfg)  # None, or the complete checkpoint to continue (same settings)
    rt = runtime.detect()
    precision = _precision(cfg, rt)
    if launch.world_size() == 1:  # one process: a kernel that trained in one precision may train in another
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # accelerate's singleton refuses a second mixed_precision otherwise
    accelerator = launch.make_accelerator(cfg, precision, cpu=rt.device == "cpu")
    if rt.rehearsal and precision == "fp16":
        placement.rehearse_t4(accelerator)
    device = accelerator.device
    weight_dtype = DTYPES[precision]
    set_seed(cfg.seed)  # the global RNGs too: LoRA's initial adapters, for one, are drawn from them
    run.start(out, cfg.to_dict(), {"runtime": rt.describe(), "device": str(device), "precision": precision})
    procs, rank = accelerator.num_processes, accelerator.process_index
    in_backward, why_not = optim.in_backward_active(cfg, procs)
    if cfg.optimizer_in_backward and not in_backward:
        print(f"optimizer_in_backward: using the normal optimizer instead, because of {why_not}.")
    if accelerator.is_main_process:
        print(launch.effective_batch(cfg, procs)[1])

    # --- model and method: which parameters train
    parts = parts or load_parts(cfg.model)
    method = methods.setup(cfg, parts)
    live.parts, live.params, live.device = parts, method.params, device
    live.modes = {n: getattr(parts, n).training for n in ("unet", "text_encoder", "vae")}
    for name in ("unet", "text_encoder", "vae"):
        placement.place(getattr(parts, name), device, torch.float32 if name in method.full_precision else weight_dtype)
    if cfg.gradient_checkpointing:
        # the UNet's activations dominate even when it is frozen (TI: gradients flow through it to the embedding)
        parts.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            parts.text_encoder.gradient_checkpointing_enable()
    prediction = parts.prediction_type if cfg.prediction_type == "auto" else cfg.prediction_type
    # "auto": fine-tune with the noise and loss weighting the model was pretrained with (SD 1.5: neither)
    pretrained = parts.pretraining
    noise_offset = pretrained.get("offset_noise", 0.0) if cfg.noise_offset == "auto" else cfg.noise_offset
    snr_gamma = pretrained.get("snr_gamma", 0.0) if cfg.snr_gamma == "auto" else cfg.snr_gamma
    guards.check_disk(guards.run_disk_needs(cfg, parts, method, len(ckpts.complete()),  # before any class image
                                            checkpoint.step_of(resume_from) if resume_from else 0,
                                            cfg.use_8bit_adam and rt.gpu_path))

    # --- scores during training (main process only): its models load now, so a missing one stops the run at once
    tracker = (tracking.Tracker.for_training(cfg, parts, method, out)
               if cfg.eval_steps and accelerator.is_main_process else None)

    # --- data: images -> latents (once), prompts -> embeddings (once, when the text encoder is frozen)
    expand = (lambda s: s.replace(cfg.placeholder_token, " ".join(methods.ti_tokens(cfg)))) \
        if cfg.method == "textual_inversion" else (lambda s: s)
    instance = data.load_folder(cfg.instance_dir, cfg.resolution, "instance")
    inst_prompts = [expand(e.caption or cfg.instance_prompt) for e in instance]
    class_ex, class_prompts = [], []
    if cfg.with_prior_preservation:
        from .prior import ensure_class_images

        with accelerator.main_process_first():  # one process generates, the others then find them cached
            ensure_class_images(parts, cfg.class_prompt, cfg.class_dir, cfg.num_class_images, cfg.resolution,
                                seed=cfg.seed, batch_size=cfg.class_batch_size, steps=cfg.sample_steps,
                                guidance=cfg.guidance_scale, scheduler=cfg.sample_scheduler,
                                device=device, dtype=weight_dtype)
        class_ex = data.load_folder(cfg.class_dir, cfg.resolution, "class")[: cfg.num_class_images]
        class_prompts = [cfg.class_prompt] * len(class_ex)
    flips = (False, True) if cfg.random_flip else (False,)
    crop_rng = np.random.default_rng(cfg.seed)

    def pixels(examples):  # [n, flips, 3, H, W]
        return torch.stack([torch.stack([data.to_tensor(e.image, cfg.resolution, cfg.center_crop, f, crop_rng)
                                         for f in flips]) for e in examples])

    scaling = parts.vae.config.scaling_factor

    @torch.no_grad()
    def encode(px: torch.Tensor) -> torch.Tensor:  # 8 pictures at a time on the device, the rest stay on the CPU
        flat, gen = px.flatten(0, 1), torch.Generator().manual_seed(cfg.seed)
        lat = torch.cat([parts.vae.encode(flat[i:i + 8].to(device, weight_dtype)).latent_dist.sample(generator=gen)
                         .float().cpu() for i in range(0, len(flat), 8)])
        return (lat * scaling).unflatten(0, px.shape[:2])

    inst_px, class_px = pixels(instance), pixels(class_ex) if class_ex else None
    if cfg.cache_latents:
        inst_src = encode(inst_px).cpu()
        class_src = encode(class_px).cpu() if class_px is not None else None
        parts.vae.to("cpu")  # not needed again until validation: frees its memory for training
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        inst_src, class_src = inst_px, class_px

    cached_emb = None
    if not method.trains_text_encoder:
        with torch.no_grad():
            uniq = sorted(set(inst_prompts + class_prompts))
            embs = _encode_prompts(parts, uniq, device).float().cpu()
            cached_emb = dict(zip(uniq, embs))

    # --- optimizer, LR schedule, accelerator
    # the rehearsal makes the optimizer a T4 would get (8-bit AdamW runs on a CPU too)
    optimizer = optim.make_optimizer(method.params, cfg, "cuda" if rt.gpu_path else rt.device, in_backward=in_backward,
                                     scaler=accelerator.scaler, offloaded=bool(cfg.deepspeed_config))
    live.optimizer = optimizer
    lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=cfg.max_train_steps)
    trainable = method.trainable_modules(parts)
    # the in-backward optimizer steps inside backward: accelerate must not wrap it (nothing to step after)
    prepared = accelerator.prepare(*trainable.values(), *([] if in_backward else [optimizer]))
    prepared = prepared if isinstance(prepared, (tuple, list)) else (prepared,)
    wrapped = dict(zip(trainable, prepared))
    optimizer = optimizer if in_backward else prepared[-1]
    # DeepSpeed keeps the UNet itself in half precision (no autocast): its inputs must match
    unet_input = weight_dtype if cfg.deepspeed_config else torch.float32
    unet = wrapped.get("unet", parts.unet)
    text_encoder = wrapped.get("text_encoder", parts.text_encoder)
    for m in wrapped.values():
        m.train()

    sched = parts.noise_scheduler
    n_inst, bs = len(instance), cfg.train_batch_size

    def latents_of(src, idx, gen) -> torch.Tensor:
        f = torch.randint(0, len(flips), (len(idx),), generator=gen)
        x = src[idx, f]
        if cfg.cache_latents:
            return x.to(device)
        with torch.no_grad():
            return parts.vae.encode(x.to(device, weight_dtype)).latent_dist.sample().float() * scaling

    def step_loss(micro: int, te_trains: bool) -> tuple[torch.Tensor, dict]:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro)
        idx = data.batch_indices(n_inst, bs, micro, cfg.seed)
        lat, prm = [latents_of(inst_src, idx, gen)], [inst_prompts[i] for i in idx]
        if class_src is not None:
            cidx = data.batch_indices(len(class_ex), bs, micro, cfg.seed + 1)
            lat.append(latents_of(class_src, cidx, gen))
            prm += [class_prompts[i] for i in cidx]
        latents = torch.cat(lat)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen).to(device)
        if noise_offset:  # a per-image, per-channel shift: lets the model change a picture's mean colour
            noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen).to(device)
        noisy = sched.add_noise(latents, noise, t)
        if cached_emb is not None:
            emb = torch.stack([cached_emb[p] for p in prm]).to(device)
        else:
            ids = parts.tokenizer(prm, padding="max_length", truncation=True,
                                  max_length=parts.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
            with contextlib.nullcontext() if te_trains else torch.no_grad():
                emb = text_encoder(ids)[0]
        target = noise if prediction == "epsilon" else sched.get_velocity(latents, noise, t)
        with accelerator.autocast():
            pred = unet(noisy.to(unet_input), t, emb.to(unet_input)).sample.float()
        per_image = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if snr_gamma:  # min-SNR weighting (Hang et al. 2023), as diffusers' examples do it
            snr = compute_snr(sched, t)
            weight = torch.clamp(snr, max=snr_gamma) / (snr if prediction == "epsilon" else snr + 1)
            per_image = per_image * weight
        if class_src is not None:
            inst_loss, prior_loss = (part.mean() for part in per_image.chunk(2))
            return inst_loss + cfg.prior_loss_weight * prior_loss, {"instance": inst_loss.item(), "prior": prior_loss.item()}
        return per_image.mean(), {}

    # --- resume: weights, optimizer moments, LR schedule, GradScaler and RNGs as they were at the checkpoint
    resumable = checkpoint.Resumable(checkpoint.trainable_params(parts, method), optimizer, lr_sched, accelerator.scaler)
    fingerprint = checkpoint.data_fingerprint({"instance": [(e.path, p) for e, p in zip(instance, inst_prompts)],
                                               "class": [(e.path, p) for e, p in zip(class_ex, class_prompts)]})
    state = checkpoint.Progress()
    if resume_from:
        state = checkpoint.resume(resume_from, resumable, cfg, fingerprint, out)
        run.update(resumed_from=str(resume_from), resumed_at_step=state.step, steps_done=state.step)
    if tracker:
        tracker.restore(state.metrics, state.best, fresh=not resume_from)
        if not resume_from:  # the untrained model: the baseline of every curve
            with _sampling(cfg, parts, device, precision, weight_dtype) as pipe:
                tracker.update(0, pipe)

    # --- the loop
    acc = cfg.gradient_accumulation_steps
    advice = guards.training_advice(cfg, rt)
    step_seconds: list[float] = []
    scaler, scales, skipped = accelerator.scaler, [], []  # fp16: the loss scale after each step, steps skipped
    bar = tqdm(range(state.step, cfg.max_train_steps), initial=state.step, total=cfg.max_train_steps,
               desc=f"{method.name}", disable=not progress)
    for step in bar:
        t_step = time.perf_counter()
        te_trains = method.trains_text_encoder and (cfg.text_encoder_steps is None or step < cfg.text_encoder_steps)
        if method.trains_text_encoder and not te_trains:
            parts.text_encoder.requires_grad_(False)  # AdamW skips parameters without gradients
        with guards.out_of_memory("the training step", advice):
            total = 0.0
            for k in range(acc):
                sync = k == acc - 1
                ctx = contextlib.ExitStack()
                if not sync:
                    for m in wrapped.values():
                        ctx.enter_context(accelerator.no_sync(m))
                with ctx:
                    # each process draws its own samples (with one process: micro-step step * acc + k)
                    loss, terms = step_loss((step * acc + k) * procs + rank, te_trains)
                    accelerator.backward(loss / acc)
                total += loss.item() / acc
            if not math.isfinite(total):  # stop before the update: the last checkpoint stays the last good one
                raise guards.non_finite_loss(total, step, ckpts.latest(), precision)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(method.params, cfg.max_grad_norm)
            overflowed = getattr(optimizer, "skipped", 0)  # the in-backward optimizer counts its own
            optimizer.step()
            if scaler is not None:  # a step whose gradients overflowed was skipped, not applied; the scale halved
                scales.append(scaler.get_scale())
                if accelerator.optimizer_step_was_skipped or getattr(optimizer, "skipped", 0) > overflowed:
                    skipped.append(step + 1)
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_step()
        step_seconds.append(time.perf_counter() - t_step)
        state.log.append({"step": step + 1, "loss": total, "lr": lr_sched.get_last_lr()[0], **terms})
        bar.set_postfix(loss=f"{total:.4f}")
        done = run.steps_done = step + 1
        if (accelerator.is_main_process and cfg.validation_prompts and cfg.validation_steps
                and (done % cfg.validation_steps == 0 or done == cfg.max_train_steps)):
            state.validation[done] = _validate(cfg, parts, out, done, device, precision, weight_dtype)
        if tracker and (done % cfg.eval_steps == 0 or done == cfg.max_train_steps):
            with _sampling(cfg, parts, device, precision, weight_dtype) as pipe:
                tracker.update(done, pipe)  # metrics.json, best/, the overfit warning
        if accelerator.is_main_process and cfg.checkpointing_steps and done % cfg.checkpointing_steps == 0:
            saved_at = ckpts.save(done, resumable, {
                "method": method.name, "config": cfg.to_dict(), "data": fingerprint, "log": state.log,
                "validation": {s: p.relative_to(out).as_posix() for s, p in state.validation.items()},
                **(tracker.state() if tracker else {})})
            (out / "losses.json").write_text(json.dumps(state.log))
            run.update(steps_done=done, last_checkpoint=str(saved_at))
    bar.close()
    if in_backward:
        optimizer.close()  # the parts outlive this run: no stale optimizer may step them later

    # --- save
    for m in (parts.unet, parts.text_encoder):
        m.eval()
    parts.unet = placement.unprepare(unet)
    if cfg.deepspeed_config:
        placement.deepspeed_master_weights(parts.unet)
    parts.text_encoder = placement.unprepare(text_encoder)
    parts.vae.to(device)
    saved = method.save(parts, out / "model") if accelerator.is_main_process else out / "model"
    (out / "losses.json").write_text(json.dumps(state.log))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    run.finish("finished", steps_done=cfg.max_train_steps, saved=str(saved))
    if tracker:
        print(tracker.summary())
    info = {"precision": precision, "device": str(device), "prediction_type": prediction, "noise_offset": noise_offset,
            "snr_gamma": snr_gamma, "runtime": rt.describe(),
            "resumed_from": state.resumed_from, "manifest": run.path,
            "optimizer": getattr(optimizer, "name", None) or type(getattr(optimizer, "optimizer", optimizer)).__name__,
            "optimizer_in_backward": in_backward,
            "processes": procs, "effective_batch": launch.effective_batch(cfg, procs)[0],
            "step_seconds": step_seconds, "grad_scales": scales, "skipped_steps": skipped,
            "cuda_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    losses = [row["loss"] for row in state.log]
    return TrainResult(out, saved, losses, state.validation, time.perf_counter() - t0, parts, method, cfg, info,
                       tracker.rows if tracker else [], tracker.best if tracker else None)


@contextlib.contextmanager
def _sampling(cfg, parts, device, precision, weight_dtype):
    """A pipeline over the parts in training, for samples mid-run: VAE on the device, eval mode, autocast;
    all put back afterwards."""
    vae_device = next(parts.vae.parameters()).device
    parts.vae.to(device)
    was_training = parts.unet.training, parts.text_encoder.training
    parts.unet.eval()
    parts.text_encoder.eval()
    try:
        # no autocast weight cache: it would keep a half copy of every fp32 trained weight (1.6 GiB for SD 1.5's
        # UNet) for the whole sampling loop
        with torch.no_grad(), torch.autocast(device.type, dtype=weight_dtype, enabled=precision != "no",
                                             cache_enabled=False):
            yield pipeline(parts, cfg.sample_scheduler)
    finally:
        parts.unet.train(was_training[0])
        parts.text_encoder.train(was_training[1])
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
