"""Measure the memory a training step allocates, on any device, including a full-size model simulated on a CPU.

`LiveBytes` is a torch dispatch mode that sees every tensor an operation creates, counts its storage's bytes
while the storage lives, and records the peak (overall and per phase: forward, backward). Run under
`FakeTensorMode`, tensors have shapes and dtypes but no data, so a step of full-size SD 1.5 at 512 px is
"run" on a CPU in seconds without allocating its gigabytes: the count is exactly what the step would allocate,
tensor by tensor, before the CUDA caching allocator rounds it up. `simulate_step` does that for each way the
kit trains (method, text encoder, gradient checkpointing, optimizer-in-backward, mixed precision), and is what
`nbkit.planner` calibrates its activation model on.

Caveats, stated: CPU autocast in bf16 stands in for CUDA autocast in fp16 (same 2 bytes; the two autocast
op lists differ a little); attention runs through `scaled_dot_product_attention`'s flash kernel as it does on a
GPU (memory linear in tokens); allocator rounding, fragmentation and cuBLAS/cuDNN workspaces are not counted
(the planner adds them separately).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KINDS = ("unet", "unet_te", "lora", "lora_te", "ti")  # what trains: UNet, +text encoder, LoRA, LoRA+TE, TI


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
    from .config import TrainConfig

    if kind in ("unet", "unet_te"):
        return TrainConfig(method="dreambooth", train_text_encoder=kind == "unet_te")
    if kind in ("lora", "lora_te"):
        return TrainConfig(method="lora", lora_text_encoder=kind == "lora_te")
    if kind == "ti":
        return TrainConfig(method="textual_inversion", instance_prompt="a photo of <zwx>")
    raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")


def simulate_step(spec, kind: str = "unet", *, batch: int = 1, latent: int = 64, checkpointing: bool = False,
                  half: bool = True, in_backward: bool = False, fake: bool = True) -> StepMemory:
    """Allocations of one training step of the model in folder `spec` (configs only: weights are not read).

    batch counts every sample in the UNet call (with prior preservation: twice the batch size); latent is the
    latent side (image side / VAE factor). half: mixed precision as the training loop runs it (frozen weights
    in half precision, trained ones in fp32 under autocast); otherwise everything fp32. fake=False runs the
    real computation (for small models: a measurement rather than a simulation).
    """
    with _castable_fakes():
        return _simulate(spec, kind, batch, latent, checkpointing, half, in_backward, fake, torch.bfloat16)


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


def _simulate(spec, kind, batch, latent, checkpointing, half, in_backward, fake, half_dtype) -> StepMemory:
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import methods, sd15

    with FakeTensorMode() if fake else contextlib.nullcontext():
        # as the training loop places them: trained weights in fp32, frozen ones in half precision
        weight_dtype = half_dtype if half else torch.float32
        dtypes = {"unet": torch.float32 if kind in ("unet", "unet_te") else weight_dtype,
                  "text_encoder": torch.float32 if kind in ("unet_te", "ti") else weight_dtype}
        parts = sd15.build_parts("cpu", spec=spec, with_vae=False, dtypes=dtypes)
        parts.vae = torch.nn.Module()  # not used by a step on cached latents
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
        handles = []
        if in_backward:
            for p in method.params:
                handles.append(p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)))
        te_cfg = parts.text_encoder.config
        latents = torch.randn(batch, parts.unet.config.in_channels, latent, latent)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        ids = torch.randint(0, te_cfg.vocab_size, (batch, parts.tokenizer.model_max_length))
        cached = None if method.trains_text_encoder else torch.randn(batch, ids.shape[1], te_cfg.hidden_size)
        # as the loop's accelerator: no autocast weight cache (with checkpointing it would hold a half copy of
        # every trained weight through the forward pass; without, the copies are kept for backward anyway)
        amp = torch.autocast("cpu", dtype=half_dtype, enabled=half, cache_enabled=False)
        tracker = LiveBytes()
        with tracker:
            tracker.mark("forward")
            with amp:
                emb = cached if cached is not None else parts.text_encoder(ids)[0]
                pred = parts.unet(latents, t, emb).sample
            loss = F.mse_loss(pred.float(), noise)
            tracker.mark("backward")
            loss.backward()
            del loss, pred, emb
            tracker.mark("after")
        for h in handles:
            h.remove()
    return StepMemory(tracker.phase_peaks["forward"], tracker.phase_peaks["backward"], tracker.current,
                      dict(kind=kind, batch=batch, latent=latent, checkpointing=checkpointing, half=half,
                           in_backward=in_backward, fake=fake))


def simulate_vae_encode(spec, *, batch: int = 1, size: int = 512, half: bool = True, fake: bool = True) -> int:
    """Peak bytes the VAE's encoder allocates encoding `batch` images of `size` px without gradients."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .sd15 import configs

    with FakeTensorMode() if fake else contextlib.nullcontext():
        from .sd15 import _default_dtype

        with _default_dtype(torch.bfloat16 if half else torch.float32):
            vae = AutoencoderKL.from_config(configs(spec)["vae"])
        px = torch.randn(batch, 3, size, size, dtype=vae.dtype)
        tracker = LiveBytes()
        with tracker, torch.no_grad():
            tracker.mark("encode")
            vae.encode(px).latent_dist.sample()
    return tracker.phase_peaks["encode"]
