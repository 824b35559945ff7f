"""Measure the memory a training step allocates, on any device, including a full-size model simulated on a CPU.

`LiveBytes` is a torch dispatch mode that sees every tensor an operation creates, counts its storage's bytes
while the storage lives, and records the peak (overall and per phase: forward, backward). Run under
`FakeTensorMode`, tensors have shapes and dtypes but no data, so a step of full-size SD 1.5 at 512 px is
"run" on a CPU in seconds without allocating its gigabytes: the count is exactly what the step would allocate,
tensor by tensor, before the CUDA caching allocator rounds it up. `simulate_step` does that for each way the
kit trains (method, text encoder, gradient checkpointing, optimizer-in-backward, mixed precision), and is what
`nbkit.memory.planner` calibrates its activation model on.

`grads_held=True` simulates DDP's backward (every gradient allocated before the step, in its bucket);
`calibrate` turns the simulations into the planner's calibration (`python -m nbkit calibrate`).

Caveats, stated: CPU autocast in bf16 stands in for CUDA autocast in fp16 (same 2 bytes), except that CUDA's
runs group_norm / layer_norm in fp32: `cuda_norm_factor` measures what that adds to the saved activations
(saved-tensor hooks, CUDA's policy emulated) and the planner applies it (nbkit.memory.actmodel.CUDA_NORM_FACTOR);
the other op lists differ a little. Attention runs through `scaled_dot_product_attention`'s flash kernel as
it does on a GPU (memory linear in tokens); allocator rounding, fragmentation and cuBLAS/cuDNN workspaces are
not counted (the planner adds them separately).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("unet", "unet_te", "lora", "lora_te", "ti")  # what trains: UNet, +text encoder, LoRA, LoRA+TE, TI
SDXL_KINDS = ("unet", "lora")  # SDXL: the UNet's configurations (text encoders frozen, prompt embeddings cached)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created while active and still alive; peak overall and per phase."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.phase = "start"
        self.phase_peaks: dict[str, int] = {}

    def mark(self, phase: str) -> None:
        """Start a new phase; its peak is counted from the current live bytes."""
        self.phase = phase
        self.phase_peaks[phase] = self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            return
        n = st.nbytes()
        self._live[key] = n
        self.current += n
        weakref.finalize(st, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
        if self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and not a.is_sparse}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_sparse:
                continue
            key = t.untyped_storage()._cdata
            if key in inputs and key not in self._live:
                continue  # a view of, or an in-place result on, memory that existed before (a weight): not new
            self._add(t)
        return out


@dataclass
class StepMemory:
    """What one training step allocated beyond the model and optimizer that existed before it (bytes)."""

    forward_peak: int  # during the forward pass (activations, autocast weight copies, temporaries)
    backward_peak: int  # during the backward pass (gradients as they appear, activations as they go)
    after: int  # still alive after backward (the gradients, unless the optimizer ran in backward)
    settings: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.backward_peak)


def _method_config(kind: str):
    from nbkit.config import TrainConfig

    if kind in ("unet", "unet_te"):
        return TrainConfig(method="dreambooth", train_text_encoder=kind == "unet_te")
    if kind in ("lora", "lora_te"):
        return TrainConfig(method="lora", lora_text_encoder=kind == "lora_te")
    if kind == "ti":
        return TrainConfig(method="textual_inversion", instance_prompt="a photo of <zwx>")
    raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")


def simulate_step(spec, kind: str = "unet", *, batch: int = 1, latent: int = 64, checkpointing: bool = False,
                  half: bool = True, in_backward: bool = False, fake: bool = True,
                  grads_held: bool = False) -> StepMemory:
    """Allocations of one training step of the model in folder `spec` (configs only: weights are not read).

    batch counts every sample in the UNet call (with prior preservation: twice the batch size); latent is the
    latent side (image side / VAE factor). half: mixed precision as the training loop runs it (frozen weights
    in half precision, trained ones in fp32 under autocast); otherwise everything fp32. fake=False runs the
    real computation (for small models: a measurement rather than a simulation). grads_held: every gradient
    exists before the step, as in DDP's buckets (gradient_as_bucket_view), and is not counted.
    """
    with _castable_fakes():
        return _simulate(spec, kind, batch, latent, checkpointing, half, (in_backward, grads_held), fake,
                         torch.bfloat16)


@contextlib.contextmanager
def _castable_fakes():
    """Let `module.to(dtype)` work on fake parameters (peft casts its adapters so): torch swaps fake tensors,
    which their fake mode's weak references forbid; setting `.data` does the same for a shape-only tensor."""
    import torch.utils

    original = torch.utils.swap_tensors

    def set_data(t1, t2):
        with torch.no_grad():
            t1.data = t2.data

    torch.utils.swap_tensors = set_data
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def _simulate(spec, kind, batch, latent, checkpointing, half, grads, fake, half_dtype) -> StepMemory:
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nbkit.memory import sdxlarch
    from nbkit.training import methods

    with FakeTensorMode() if fake else contextlib.nullcontext():
        # as the training loop places them: trained weights in fp32, frozen ones in half precision
        weight_dtype = half_dtype if half else torch.float32
        dtypes = {"unet": torch.float32 if kind in ("unet", "unet_te") else weight_dtype,
                  "text_encoder": torch.float32 if kind in ("unet_te", "ti") else weight_dtype}
        parts = _step_parts(spec, kind, dtypes)
        cfg = _method_config(kind)
        method = methods.setup(cfg, parts)
        trainable = method.trainable_modules(parts)
        if method.name == "lora":
            from diffusers.training_utils import cast_training_params

            cast_training_params([parts.unet, parts.text_encoder], dtype=torch.float32)
        if checkpointing:
            parts.unet.enable_gradient_checkpointing()  # as the loop: also when frozen (TI backpropagates through it)
            if method.trains_text_encoder:
                parts.text_encoder.gradient_checkpointing_enable()
        for m in trainable.values():
            m.train()
        handles = _gradient_handling(method.params, *grads)
        te_cfg = parts.text_encoder.config
        latents = torch.randn(batch, parts.unet.config.in_channels, latent, latent)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        ids = torch.randint(0, te_cfg.vocab_size, (batch, parts.tokenizer.model_max_length))
        cached = (None if method.trains_text_encoder else
                  torch.randn(batch, ids.shape[1], parts.unet.config.cross_attention_dim))
        extra = sdxlarch.added_conditions(parts.unet.config, batch)  # SDXL's pooled embedding and sizes
        # as the loop's accelerator: no autocast weight cache (with checkpointing it would hold a half copy of
        # every trained weight through the forward pass; without, the copies are kept for backward anyway)
        amp = torch.autocast("cpu", dtype=half_dtype, enabled=half, cache_enabled=False)
        tracker = LiveBytes()
        with tracker:
            tracker.mark("forward")
            with amp:
                emb = cached if cached is not None else parts.text_encoder(ids)[0]
                pred = parts.unet(latents, t, emb, **extra).sample
            loss = F.mse_loss(pred.float(), noise)
            tracker.mark("backward")
            loss.backward()
            del loss, pred, emb
            tracker.mark("after")
        for h in handles:
            h.remove()
    return StepMemory(tracker.phase_peaks["forward"], tracker.phase_peaks["backward"], tracker.current,
                      dict(kind=kind, batch=batch, latent=latent, checkpointing=checkpointing, half=half,
                           in_backward=grads[0], grads_held=grads[1], fake=fake))


def _step_parts(spec, kind: str, dtypes: dict):
    """The parts a step on cached latents uses (no VAE), as the training loop places them. SDXL (nbkit.memory.sdxlarch):
    its UNet and first text encoder in an SDParts; the step runs on cached prompt embeddings (2048 wide), so the
    text-encoder-training kinds are not simulated for it."""
    from nbkit.memory import sdxlarch
    from nbkit.models import sd15
    from nbkit.models.parts import SDParts

    if not sdxlarch.is_sdxl_folder(spec):
        parts = sd15.build_parts("cpu", spec=spec, with_vae=False, dtypes=dtypes)
    else:
        if kind not in SDXL_KINDS:
            raise ValueError(f"kind={kind!r} is not simulated for SDXL: choose one of {', '.join(SDXL_KINDS)}.")
        nets = sdxlarch.build("cpu", spec=spec, with_vae=False, dtypes=dtypes, text_encoder_2=False)
        parts = SDParts(sd15.tokenizer(), nets.text_encoder, None, nets.unet, None, str(spec))
    parts.vae = torch.nn.Module()  # not used by a step on cached latents
    return parts


def _gradient_handling(params, in_backward: bool, grads_held: bool) -> list:
    """in_backward: each gradient is dropped once made (the optimizer steps on it there). grads_held: every
    gradient is allocated before the step, as DDP's buckets are; backward then makes each parameter's gradient
    and adds it in place (one at a time), as DDP copies it into its bucket."""
    if grads_held:
        for p in params:
            p.grad = torch.zeros_like(p)
    if not in_backward:
        return []
    return [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]


def simulate_vae_encode(spec, *, batch: int = 1, size: int = 512, half: bool = True, fake: bool = True,
                        decode: bool = False) -> int:
    """Peak bytes the VAE's encoder allocates encoding `batch` images of `size` px without gradients (decode: its
    decoder making them from latents, as sampling does)."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nbkit.models.sd15 import configs

    with FakeTensorMode() if fake else contextlib.nullcontext():
        from nbkit.models.sd15 import _default_dtype

        with _default_dtype(torch.bfloat16 if half else torch.float32):
            vae = AutoencoderKL.from_config(configs(spec)["vae"])
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        x = (torch.randn(batch, vae.config.latent_channels, size // factor, size // factor, dtype=vae.dtype) if decode
             else torch.randn(batch, 3, size, size, dtype=vae.dtype))
        tracker = LiveBytes()
        with tracker, torch.no_grad():
            tracker.mark("run")
            vae.decode(x) if decode else vae.encode(x).latent_dist.sample()
    return tracker.phase_peaks["run"]


# ------------------------------------------------------------------------------- CUDA's autocast, on a CPU
@contextlib.contextmanager
def cuda_autocast_norms(seen: dict | None = None):
    """Run group_norm / layer_norm as CUDA autocast does (they are on its fp32 list: inputs cast to fp32, fp32
    out) under CPU autocast, which runs them in 16 bits. `seen`, if given, collects the storages of the norms'
    inputs ('in') and outputs ('out'); with seen['cpu'] true the norms run as CPU autocast runs them."""
    import torch.nn.functional as F

    originals = F.group_norm, F.layer_norm
    seen = seen if seen is not None else {}

    def f32(t):
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def wrap(norm):
        def run(x, *args, **kw):
            if torch.is_autocast_enabled("cpu") and not seen.get("cpu"):
                with torch.autocast("cpu", enabled=False):
                    y = norm(f32(x), *map(f32, args), **{k: f32(v) for k, v in kw.items()})
            else:
                y = norm(x, *args, **kw)
            seen.setdefault("in", set()).add(x.untyped_storage()._cdata)
            seen.setdefault("out", set()).add(y.untyped_storage()._cdata)
            return y
        return run

    F.group_norm, F.layer_norm = map(wrap, originals)
    try:
        yield seen
    finally:
        F.group_norm, F.layer_norm = originals


@dataclass
class SavedBytes:
    """Bytes of the distinct storages a forward pass saves for backward (parameters excluded)."""

    total: int
    norm_inputs: int  # saved storages that are a group_norm / layer_norm input
    norm_outputs: int  # ... output (saved by the op after the norm)


def saved_activations(unet, *, batch: int, latent: int, cuda: bool, dtype=torch.bfloat16) -> SavedBytes:
    """What the UNet's forward saves for backward under CPU autocast in `dtype`; cuda: with the norms as CUDA's
    autocast runs them (cuda_autocast_norms). The prompt embedding requires grad, so a frozen UNet saves what
    LoRA / TI backpropagate through. Works on fake tensors (build the UNet and call this in a FakeTensorMode)."""
    from nbkit.memory import sdxlarch

    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            saved.setdefault(st._cdata, st.nbytes())
        return t

    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, latent, latent)
    emb = torch.randn(batch, 77, cfg.cross_attention_dim, requires_grad=True)
    t = torch.randint(0, 1000, (batch,))
    extra = sdxlarch.added_conditions(cfg, batch)  # SDXL's pooled embedding and sizes
    with cuda_autocast_norms({"cpu": not cuda}) as seen, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):  # as the training loop: no weight cache
            unet(x, t, emb, **extra)
    return SavedBytes(sum(saved.values()), sum(b for k, b in saved.items() if k in seen.get("in", ())),
                      sum(b for k, b in saved.items() if k in seen.get("out", ())))


def cuda_norm_factor(unet_config: dict, latent: int, *, trained: bool = True, fake: bool = True) -> dict:
    """How much more a forward pass saves per sample on CUDA than under the calibration's CPU autocast, for a
    UNet built from `unet_config` (trained: fp32 weights, else frozen bf16 ones). Returns the factor
    (nbkit.memory.actmodel.CUDA_NORM_FACTOR) and the CPU trace's norm input / output fractions of the saved bytes."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nbkit.models.sd15 import _default_dtype

    with FakeTensorMode() if fake else contextlib.nullcontext():
        with _default_dtype(torch.float32 if trained else torch.bfloat16):
            unet = UNet2DConditionModel.from_config(unet_config)
        unet.requires_grad_(trained)
        cpu = [saved_activations(unet, batch=b, latent=latent, cuda=False) for b in (1, 2)]
        cuda = [saved_activations(unet, batch=b, latent=latent, cuda=True) for b in (1, 2)]
    per_cpu = SavedBytes(*(b - a for a, b in zip(vars(cpu[0]).values(), vars(cpu[1]).values())))
    per_cuda = cuda[1].total - cuda[0].total
    return {"factor": per_cuda / per_cpu.total, "norm_inputs": per_cpu.norm_inputs / per_cpu.total,
            "norm_outputs": per_cpu.norm_outputs / per_cpu.total, "saved_per_sample": per_cpu.total}


# ------------------------------------------------------------------------------- the planner's calibration
def calibrate(spec, *, name: str, latent: int, fake: bool = True, half_only: bool = False, kinds=None,
              held: bool = True, progress=print) -> dict:
    """Measure the activation model of the architecture in `spec` (nbkit.memory.actmodel): each configuration's step
    simulated at batch 1 and 2, split into a fixed and a per-sample part. held=False: without DDP's H rows.
    SDXL (nbkit.memory.sdxlarch): the UNet's kinds only (SDXL_KINDS), the VAE in fp32 as the kit runs it, and
    CUDA's fp32-norm factor measured for its UNet (`cuda_norm_factor`, at half the reference latent side)."""
    import json

    from nbkit.memory import sdxlarch
    from nbkit.memory.actmodel import config_key, fingerprint
    from nbkit.models.sd15 import build_parts

    xl = sdxlarch.is_sdxl_folder(spec)
    parts = sdxlarch.build("meta", spec=spec) if xl else build_parts("meta", spec=spec)
    te2 = parts.text_encoder_2.config.to_dict() if xl else None
    fp = fingerprint(dict(parts.unet.config), parts.text_encoder.config.to_dict(), te2)
    out = {"name": name, "reference_latent": latent, "configs": {},
           "unet_params": sum(p.numel() for p in parts.unet.parameters())}
    combos = [(k, ck, False) for k in KINDS for ck in (False, True)]
    combos += [(k, ck, True) for k in ("unet", "unet_te") for ck in (False, True)]
    combos = [c for c in combos if not xl or c[0] in SDXL_KINDS]
    if kinds:
        combos = [c for c in combos if f"{c[0]}|ib={int(c[2])}" in kinds or c[0] in kinds]
    for half in ((True,) if half_only else (True, False)):
        for kind, ck, ib in combos:
            one, two = (simulate_step(spec, kind, batch=b, latent=latent, checkpointing=ck, half=half,
                                      in_backward=ib, fake=fake) for b in (1, 2))
            row = {"F0": 2 * one.forward_peak - two.forward_peak, "Fs": two.forward_peak - one.forward_peak,
                   "B0": 2 * one.backward_peak - two.backward_peak, "Bs": two.backward_peak - one.backward_peak,
                   "G": one.after}
            if not ib and held:  # DDP's backward: every gradient held in its bucket from the start (ddp_buckets)
                row.update(_held_backward(spec, kind, latent, ck, half, fake))
            out["configs"][config_key(kind, ck, ib, half)] = row
            progress(f"{config_key(kind, ck, ib, half)}: {json.dumps(row)}")
    if xl and (not kinds or "norms" in kinds):
        out["cuda_norm_factor"] = round(cuda_norm_factor(dict(parts.unet.config), latent // 2, trained=False,
                                                         fake=fake)["factor"], 4)
    if kinds and "vae" not in kinds:
        return {fp: out}
    vae_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    fp32_vae = bool(parts.vae.config.get("force_upcast", False)) and xl  # the kit keeps SDXL's VAE in fp32
    for what in ("encode", "decode"):
        out[f"vae_{what}_per_image"] = simulate_vae_encode(spec, batch=1, size=latent * vae_factor, half=not fp32_vae,
                                                           fake=fake, decode=what == "decode")
    out["vae_dtype"] = "fp32" if fp32_vae else "half"
    return {fp: out}


def _held_backward(spec, kind: str, latent: int, checkpointing: bool, half: bool, fake: bool) -> dict:
    """H0 + n Hs: the backward peak beyond the gradients when they are all held before the step (DDP)."""
    one, two = (simulate_step(spec, kind, batch=b, latent=latent, checkpointing=checkpointing, half=half,
                              fake=fake, grads_held=True).backward_peak for b in (1, 2))
    return {"H0": 2 * one - two, "Hs": two - one}


def main(argv=None) -> None:
    """`python -m nbkit calibrate`: measure an architecture's activation model and store it."""
    import argparse
    from pathlib import Path

    from nbkit.memory import sdxlarch
    from nbkit.memory.actmodel import CALIBRATION_FILE, REFERENCE, save_calibration
    from nbkit.models.offline import OFFLINE_SPEC
    from nbkit.models.sd15 import SPEC

    ap = argparse.ArgumentParser(prog="python -m nbkit", description="Calibrate the memory planner.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure an architecture's activation model with nbkit.memory.memtrace")
    c.add_argument("--spec", default="sd15", help="'sd15', 'sdxl', 'offline' or a diffusers folder (configs suffice)")
    c.add_argument("--latent", type=int, default=None, help="reference latent side (default: sd15 64, sdxl 128, "
                                                            "offline 16)")
    c.add_argument("--real", action="store_true", help="run real tensors (small models) instead of fake ones")
    c.add_argument("--half-only", action="store_true", help="skip the fp32 configurations")
    c.add_argument("--kinds", default=None, help="comma list: only these (e.g. lora,ti,unet|ib=1,vae; SDXL: norms)")
    c.add_argument("--no-held", action="store_true", help="skip DDP's held-gradient backward (the H rows)")
    c.add_argument("--out", default=str(CALIBRATION_FILE))
    args = ap.parse_args(argv)
    spec = {"sd15": SPEC, "offline": OFFLINE_SPEC, "sdxl": sdxlarch.SPEC}.get(args.spec, Path(args.spec))
    name = args.spec if args.spec in REFERENCE else Path(args.spec).name
    latent = args.latent or REFERENCE.get(args.spec, 64)
    entry = calibrate(spec, name=name, latent=latent, fake=not args.real, half_only=args.half_only,
                      kinds=args.kinds.split(",") if args.kinds else None, held=not args.no_held)
    save_calibration(entry, Path(args.out))
    print(f"wrote {args.out}")
