"""The optimizer: AdamW (torch, fused on a GPU) or 8-bit AdamW (bitsandbytes), and optionally run *in backward*.

Optimizer in backward (as in PyTorch's tutorial "How to save memory by fusing the optimizer step into the
backward pass"): every trained parameter gets its own optimizer and a post-accumulate-grad hook
(`Tensor.register_post_accumulate_grad_hook`); as soon as a parameter's gradient is complete the hook applies
the update and frees the gradient. No full set of gradients ever exists: for DreamBooth with the text encoder
that is 3.9 GB less at the peak. The training loop treats it like any optimizer: `step()` only does the
end-of-step bookkeeping and `zero_grad()` has nothing left to free.

Limits (the loop falls back to the normal optimizer, saying why; see `in_backward_active`):
- no gradient accumulation: each backward pass updates the weights;
- no clipping by the global gradient norm: that norm needs every gradient at once (set max_grad_norm=0);
- one process only (with DDP each GPU would step on its own gradients before they are averaged), no DeepSpeed.
With fp16 the loss is scaled as usual (accelerate's GradScaler); the hooks unscale each gradient, and a weight
whose gradient overflowed is not updated in that step (the scale is then halved, as GradScaler does). Unlike
GradScaler, which skips the whole step, the weights whose gradients came before the overflow were already
updated: the price of never holding all gradients. The check costs one GPU sync per parameter in fp16.

A parameter is stepped by one in-backward optimizer at a time: making a second one for a parameter still hooked
by another takes the parameter away from the old one (its hook is removed, with a printed note), so nothing is
ever updated twice per backward. `close()` (in a `finally`) removes the hooks and frees the per-parameter state.

What the optimizer keeps is counted here too (`adam_state_bytes`: the memory table, the planner and the
checkpoint size estimate all use it).
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from nbkit.config import TrainConfig

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' state in 32 bits
BNB_BLOCK = 256  # values per fp32 absmax scale in 8-bit blockwise state


def adam_state_bytes(numels: Iterable[int], eight_bit: bool = False) -> int:
    """Bytes of AdamW's two moments for tensors of these sizes: fp32 (8 bytes a value), or bitsandbytes' 8-bit
    blockwise state (a byte a value + an fp32 absmax per block of BNB_BLOCK, for each moment) for tensors of at
    least BNB_MIN_8BIT_SIZE values."""
    total = 0
    for n in numels:
        if eight_bit and n >= BNB_MIN_8BIT_SIZE:
            total += 2 * (n + 4 * (-(-n // BNB_BLOCK)))
        else:
            total += 8 * n
    return total


def in_backward_active(cfg: TrainConfig, num_processes: int = 1) -> tuple[bool, str]:
    """Whether the optimizer can run in backward for this config, and why not when it cannot."""
    if not cfg.optimizer_in_backward:
        return False, ""
    why = []
    if cfg.gradient_accumulation_steps > 1:
        why.append(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} (it steps on every backward: "
                   "set gradient_accumulation_steps=1, or raise train_batch_size instead)")
    if cfg.max_grad_norm > 0:
        why.append(f"max_grad_norm={cfg.max_grad_norm} (clipping by the global norm needs every gradient at once: "
                   "set max_grad_norm=0)")
    if num_processes > 1:
        why.append(f"{num_processes} processes (each GPU would step on its own unreduced gradients: use one GPU)")
    if cfg.deepspeed_config:
        why.append("DeepSpeed (it owns the optimizer step)")
    return (not why), "; ".join(why)


def _factory(cfg: TrainConfig, device: str, offloaded: bool = False) -> tuple[Callable, str]:
    """A function making the optimizer for a list of parameters, and its name."""
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
              eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam and not offloaded:
        if device != "cuda":
            print("8-bit Adam needs a CUDA GPU: using torch AdamW (it only saves memory, results are alike).")
        else:
            try:
                import bitsandbytes as bnb

                return (lambda params: bnb.optim.AdamW8bit(params, **kw)), "8-bit AdamW (bitsandbytes)"
            except Exception as err:  # noqa: BLE001 - any import/setup failure means: fall back, say so
                print(f"bitsandbytes 8-bit Adam is unavailable ({err}); using torch AdamW, which needs ~4x the "
                      "optimizer memory. `pip install bitsandbytes` to get it back.")
    if device == "cuda" and not offloaded:
        return (lambda params: torch.optim.AdamW(params, fused=True, **kw)), "AdamW (torch, fused)"
    return (lambda params: torch.optim.AdamW(params, **kw)), "AdamW (torch)"


def make_optimizer(params, cfg: TrainConfig, device: str, *, in_backward: bool = False, scaler=None,
                   offloaded: bool = False) -> torch.optim.Optimizer:
    """8-bit AdamW when asked and possible, else torch AdamW; per parameter in backward when `in_backward`.

    scaler: accelerate's GradScaler when training in fp16 (the in-backward hooks unscale with it).
    offloaded: the optimizer state lives on the CPU (DeepSpeed offload): plain torch AdamW.
    """
    make, name = _factory(cfg, device, offloaded)
    if in_backward:
        return InBackwardOptimizer(params, make, scaler=scaler, name=name)
    return make(list(params))


# parameter -> the in-backward optimizer whose hook steps it; weak both ways (neither is kept alive by this), keyed
# by identity (a tensor's == compares values)
_HOOKED = WeakIdKeyDictionary()


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a post-accumulate-grad hook during backward (module doc)."""

    in_backward = True

    def __init__(self, params: Iterable[torch.nn.Parameter], make_one: Callable, scaler=None, name: str = "AdamW"):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("InBackwardOptimizer got no trainable parameters.")
        self.optimizers = [make_one([p]) for p in params]
        super().__init__(params, {})
        # The scheduler sets group["lr"]: these are the per-parameter optimizers' own groups (shared dicts).
        self.param_groups = [o.param_groups[0] for o in self.optimizers]
        self.name = f"{name}, in backward"
        self._by_param = {id(p): o for p, o in zip(params, self.optimizers)}
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._inv_scale: float | None = None
        self._found_inf: torch.Tensor | None = None
        self._good_steps = 0
        self.skipped = 0  # steps in which some gradient overflowed (fp16)
        self.steps_in_backward = 0  # parameter updates applied by the hooks (a test can count them)
        self._closed = False
        self._take_over(params)
        self._handles = {id(p): p.register_post_accumulate_grad_hook(self._hook) for p in params}
        for p in params:
            _HOOKED[p] = weakref.ref(self)

    def _take_over(self, params: list[torch.nn.Parameter]) -> None:
        """Unhook these parameters from any other in-backward optimizer that still steps them."""
        stale: dict[int, tuple[InBackwardOptimizer, list]] = {}
        for p in params:
            ref = _HOOKED.get(p)
            old = ref() if ref is not None else None
            if old is not None and old is not self and id(p) in old._handles:
                stale.setdefault(id(old), (old, []))[1].append(p)
        for old, ps in stale.values():
            for p in ps:
                old._handles.pop(id(p)).remove()
            print(f"InBackwardOptimizer: {len(ps)} of these parameters were still hooked to an earlier in-backward "
                  f"optimizer ({old!r}); its hooks on them are removed, so only the new one steps them. Call "
                  ".close() on an in-backward optimizer when its run ends.")

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if self._scaler is not None:
            if self._inv_scale is None:
                self._inv_scale = 1.0 / self._scaler.get_scale()  # one sync per step
            if self._found_inf is None:
                self._found_inf = torch.zeros((), device=p.grad.device)
            g = p.grad.mul_(self._inv_scale)
            bad = (~torch.isfinite(g)).any()
            self._found_inf += bad
            if bool(bad):  # this weight's update is skipped, as GradScaler skips a whole step (one sync each)
                p.grad = None
                return
        self._by_param[id(p)].step()
        p.grad = None
        self.steps_in_backward += 1

    def step(self, closure=None):
        """End of a step: the updates were applied in backward; here fp16's loss scale is adjusted."""
        if closure is not None:
            raise ValueError("InBackwardOptimizer steps during backward; it takes no closure.")
        if self._scaler is not None and self._found_inf is not None:
            scale = self._scaler.get_scale()
            if bool(self._found_inf.item()):
                self.skipped += 1
                self._good_steps = 0
                scale *= self._scaler.get_backoff_factor()
            else:
                self._good_steps += 1
                if self._good_steps % self._scaler.get_growth_interval() == 0:
                    scale *= self._scaler.get_growth_factor()
            self._scaler.update(new_scale=scale)
        self._inv_scale = None
        self._found_inf = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: every gradient was freed as soon as it was used."""

    def state_dict(self) -> dict:
        self._check_open()
        return {"optimizers": [o.state_dict() for o in self.optimizers], "good_steps": self._good_steps,
                "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self._check_open()
        for o, s in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(s)
        self._good_steps = state_dict.get("good_steps", 0)
        self.skipped = state_dict.get("skipped", 0)
        self.param_groups = [o.param_groups[0] for o in self.optimizers]

    def remove_hooks(self) -> None:
        """Detach from the parameters (after training, or before making another optimizer for them). Idempotent."""
        for h in self._handles.values():
            h.remove()
        self._handles = {}
        for p in [p for p, ref in list(_HOOKED.items()) if ref() is self]:
            del _HOOKED[p]

    def close(self, drop_state: bool = True) -> None:
        """The end of its run (call it in a `finally`): remove the hooks and, with `drop_state`, free every
        per-parameter optimizer's state (AdamW's moments: twice the trained weights). Idempotent; afterwards
        the optimizer cannot be saved or loaded any more."""
        self.remove_hooks()
        if drop_state:
            for o in self.optimizers:
                o.state.clear()
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} was closed (its state was freed): make a new optimizer to train again.")

    def __repr__(self) -> str:
        return f"InBackwardOptimizer({self.name}, {len(self.optimizers)} parameters)"
