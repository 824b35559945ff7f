"""An exponential moving average (EMA) of the trained weights: TrainConfig.use_ema, through diffusers' EMAModel.

The average covers exactly the parameters the method trains (the UNet, and the text encoder when it trains, for
DreamBooth; the adapters for LoRA; the embedding matrix for Textual Inversion, whose untrained rows the method puts
back every step, so their average stays them). After each optimizer update `step` folds the new weights in, with
diffusers' decay schedule: min(ema_decay, n / (n + 9)) at update n (update 1 copies the weights), so in a short
fine-tune update k weighs about as k^8: the average is mostly of the last fifth of the run. Training itself always
continues on the raw weights: validation pictures, scores and best/ see the average through `applied` (store, copy
in, restore), and the run's saved model is the average (`copy_in` at the end).

Memory: the average is one more fp32 copy of the trained weights on the training device (SD 1.5's UNet: 3.4 GB;
the planner counts it); while the average is applied, diffusers keeps the raw weights in host RAM.
Checkpoints save the average and its step count (`ema-*.safetensors`, tensors named like the weights), so a resumed
run ends with the same average as one never stopped.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from nbkit.config import TrainConfig
from nbkit.safeio import save_sharded


class Ema:
    """diffusers' EMAModel over named parameters: step, apply for a while, save and load by name."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.names, self.params = list(params), list(params.values())
        self.model = EMAModel(self.params, decay=decay)  # fp32 clones, on the parameters' device

    def step(self) -> None:
        """Fold the current weights into the average (after each optimizer update)."""
        self.model.step(self.params)

    @contextlib.contextmanager
    def applied(self):
        """The average in the live parameters for the block; the raw weights back afterwards, bit for bit."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def copy_in(self) -> None:
        """The average into the live parameters for good (the end of a run: what is saved)."""
        self.model.copy_to(self.params)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The average, by parameter name."""
        return dict(zip(self.names, self.model.shadow_params))

    def save(self, folder: Path) -> dict:
        """Write the average into `folder` (ema-*.safetensors); return what checkpoint.json keeps of it."""
        files = save_sharded(((f"ema.{n}", t) for n, t in self.averaged().items()), folder, "ema")
        rest = {k: v for k, v in self.model.state_dict().items() if k != "shadow_params"}
        return {"files": files, **rest}

    def load(self, folder: Path, info: dict) -> None:
        """Restore what `save` wrote, one tensor at a time into the average's own tensors (no second copy)."""
        from safetensors import safe_open

        mine, seen = self.averaged(), set()
        for name in info["files"]:
            with safe_open(str(Path(folder) / name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    target = mine.get(key.removeprefix("ema."))
                    if target is None:
                        raise KeyError(f"{folder} holds an EMA of {key!r}, which this run does not train")
                    target.copy_(f.get_tensor(key))
                    seen.add(key.removeprefix("ema."))
        if seen != set(mine):
            raise KeyError(f"{folder} lacks the EMA of {len(set(mine) - seen)} trained tensors")
        self.model.load_state_dict({k: v for k, v in info.items() if k != "files"})


def make(cfg: TrainConfig, params: dict[str, torch.nn.Parameter]) -> Ema | None:
    """The run's EMA (cfg.use_ema), started from the weights as they are now; None without it."""
    return Ema(params, cfg.ema_decay) if cfg.use_ema else None


@contextlib.contextmanager
def applied(ema: Ema | None):
    """`ema.applied()`, or nothing when there is no EMA (or nothing due that needs it)."""
    with ema.applied() if ema is not None else contextlib.nullcontext():
        yield
