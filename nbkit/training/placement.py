"""How the parts sit in a run: on which device, in which precision, wrapped by accelerate or not; set up at the
start of nbkit.train and put back however the run ends.

- `place`: trained weights in fp32, frozen ones in half precision (fp16 on a T4), tensor by tensor;
- `rehearse_t4`: the T4 rehearsal's accelerator (runtime.REHEARSAL_ENV): fp16 autocast and a GradScaler on a CPU;
- `Live` and `unprepare`: what a run leaves on the parts (gradients, the in-backward optimizer's hooks, the VAE
  moved off the device, accelerate's autocast forward and its "prepared" mark, train mode) undone;
- `deepspeed_master_weights`: DeepSpeed's fp32 master weights back in the model before it is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nbkit.models.parts import SDParts


def rehearse_t4(accelerator) -> None:
    """The T4 rehearsal (runtime.REHEARSAL_ENV): accelerate takes fp16 on a CPU but neither autocasts nor scales
    there; give it what it does on a GPU, fp16 autocast and a real GradScaler, so every line after is a T4's."""
    accelerator.native_amp = True  # accelerator.autocast() -> torch.autocast("cpu", torch.float16)
    accelerator.scaler = torch.amp.GradScaler("cpu")


@dataclass
class Live:
    """What a run leaves on the parts while it trains, put right however it ends (an error, out of memory,
    a KeyboardInterrupt): gradients freed, the in-backward optimizer's hooks removed, the VAE back on the device.
    Training again with the same parts then starts clean."""

    parts: SDParts | None = None
    params: list = field(default_factory=list)
    optimizer: object = None
    device: torch.device | None = None
    modes: dict = field(default_factory=dict)  # module name -> training flag before the run (eval after loading)
    trackers: object = None  # nbkit.training.trackers.Trackers: flushed and closed

    def clean_up(self) -> None:
        for p in self.params:
            p.grad = None
        if hasattr(self.optimizer, "close"):  # the in-backward optimizer: its hooks off the parameters, state freed
            self.optimizer.close()
        if self.parts is not None and self.device is not None:
            self.parts.vae.to(self.device)
        for name, training in self.modes.items():  # train mode would leave dropout on in the next samples
            setattr(self.parts, name, unprepare(getattr(self.parts, name)))
            getattr(self.parts, name).train(training)
        if self.trackers is not None:
            self.trackers.end()
        # the error's frames must not keep them alive
        self.parts, self.params, self.optimizer, self.trackers = None, [], None, None


def unprepare(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module again, as accelerator.prepare found it: out of DDP, without the autocast forward that
    returns fp32 outputs, not marked prepared (a prepared mark would make the next run skip preparing it)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    model.__dict__.pop("_is_accelerate_prepared", None)
    return model


@torch.no_grad()
def place(module: torch.nn.Module, device, frozen_dtype: torch.dtype) -> None:
    """Move to the device: what trains in fp32 (DreamBooth's UNet, LoRA's adapters, TI's embedding table),
    what is frozen in `frozen_dtype` (fp16 on a T4). Tensor by tensor, so no full fp32 copy of a frozen model
    lands on the GPU first, and a trained weight is never rounded through fp16 on its way."""
    for p in module.parameters():
        want = torch.float32 if p.requires_grad else frozen_dtype
        if p.device != device or (p.is_floating_point() and p.dtype != want):
            p.data = p.data.to(device, want if p.is_floating_point() else p.dtype)
    module.to(device)  # the buffers


@torch.no_grad()
def deepspeed_master_weights(model: torch.nn.Module) -> None:
    """DeepSpeed trains fp16 weights against fp32 master copies kept in its optimizer: put the masters back in
    the model before it is saved, so that an fp32 save holds fp32 weights, not fp16-rounded ones labelled fp32."""
    from deepspeed.utils import safe_get_full_fp32_param

    for p in model.parameters():
        full = safe_get_full_fp32_param(p)
        if full is not None:
            p.data = full.detach().to(p.device).reshape(p.shape)
