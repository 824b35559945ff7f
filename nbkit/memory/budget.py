"""What fine-tuning costs in GPU memory, counted before training and measured during it.

The count is exact for the parts that do not depend on the picture size: the weights, their gradients and the
optimizer state. Activations (what backward needs from forward) depend on resolution, batch size and gradient
checkpointing; they are not estimated here, they are measured (`track_peak`, on a CUDA GPU).

Bytes per parameter, as the training loop keeps them:
- trainable weights stay fp32 even with fp16/bf16 mixed precision (fp16 weights would lose small updates);
- gradients: fp32, one per trainable weight;
- AdamW keeps two fp32 moments per trainable weight (8 bytes); bitsandbytes' 8-bit AdamW keeps them as one
  byte each plus an fp32 scale per block of 256 (tensors under 4096 values stay 32-bit): optim.adam_state_bytes;
- frozen weights are cast to the mixed-precision type (2 bytes) or stay fp32 (4 bytes);
- the VAE leaves the GPU once the latents are cached (the default), so it is not counted unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# memory.adam_state_bytes: its old home, still importable
from nbkit.training.optim import adam_state_bytes
from nbkit.units import GiB


def sd15_on_meta() -> dict[str, torch.nn.Module]:
    """SD 1.5's UNet, text encoder and VAE with no weights (on the `meta` device): shapes only, instant.
    The architecture is the one of nbkit.sd15 (data/sd15-arch), the kit's single copy of SD 1.5's configs."""
    from nbkit.models.sd15 import build_parts

    parts = build_parts("meta")
    return {"unet": parts.unet, "text_encoder": parts.text_encoder, "vae": parts.vae}


def sdxl_on_meta() -> dict[str, torch.nn.Module]:
    """SDXL base 1.0's UNet, both text encoders and VAE on the `meta` device (nbkit.memory.sdxlarch, data/sdxl-arch)."""
    from nbkit.memory import sdxlarch

    return modules_of(sdxlarch.build("meta"))


def modules_of(parts) -> dict[str, torch.nn.Module]:
    """{'unet', 'text_encoder', 'vae'} (SDXL: and 'text_encoder_2') of an SDParts (a dict of them: as is)."""
    if isinstance(parts, dict):
        return parts
    mods = {"unet": parts.unet, "text_encoder": parts.text_encoder, "vae": parts.vae}
    if getattr(parts, "text_encoder_2", None) is not None:
        mods["text_encoder_2"] = parts.text_encoder_2
    return mods


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Budget:
    """Memory a training setting needs for weights, gradients and optimizer state (activations come on top)."""

    label: str
    trainable_params: int
    frozen_params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes

    def as_dict(self) -> dict:
        return dict(label=self.label, trainable_params=self.trainable_params, frozen_params=self.frozen_params,
                    weights_bytes=self.weights_bytes, grads_bytes=self.grads_bytes,
                    optimizer_bytes=self.optimizer_bytes, total_bytes=self.total_bytes)


def budget(parts, train: tuple[str, ...] = ("unet",), *, mixed_precision: str = "no", use_8bit_adam: bool = False,
           vae_on_gpu: bool = False, label: str = "") -> Budget:
    """Count the bytes for training the modules named in `train` (full fine-tuning, as DreamBooth does)."""
    mods = modules_of(parts)
    unknown = set(train) - set(mods)
    if unknown:
        raise ValueError(f"cannot train {sorted(unknown)}: the model has {sorted(mods)}.")
    frozen_size = 4 if mixed_precision in ("no", "fp32") else 2
    trainable, frozen, weights, numels = 0, 0, 0, []
    for name, m in mods.items():
        if name == "vae" and not vae_on_gpu and name not in train:
            continue
        sizes = [p.numel() for p in m.parameters()]
        if name in train:
            trainable += sum(sizes)
            numels += sizes
            weights += 4 * sum(sizes)
        else:
            frozen += sum(sizes)
            weights += frozen_size * sum(sizes)
    return Budget(label or " + ".join(train), trainable, frozen, weights, 4 * trainable,
                  adam_state_bytes(numels, use_8bit_adam))


def compare_settings(parts) -> list[Budget]:
    """The course's ladder: UNet alone, then + text encoder, then the 16 GB preset (fp16 mixed + 8-bit AdamW)."""
    both = ("unet", "text_encoder")
    return [
        budget(parts, ("unet",), label="UNet, fp32, AdamW"),
        budget(parts, ("unet",), mixed_precision="fp16", use_8bit_adam=True, label="UNet, fp16 mixed, 8-bit AdamW"),
        budget(parts, both, label="UNet + text encoder, fp32, AdamW"),
        budget(parts, both, mixed_precision="fp16", label="UNet + text encoder, fp16 mixed, AdamW"),
        budget(parts, both, mixed_precision="fp16", use_8bit_adam=True,
               label="UNet + text encoder, fp16 mixed, 8-bit AdamW"),
    ]


def budget_table(budgets: list[Budget]) -> str:
    """A text table; sizes in GiB, or in MiB for a model too small for GiB to show anything."""
    big = max((b.total_bytes for b in budgets), default=0) >= 0.1 * GiB
    unit, div = ("GiB", GiB) if big else ("MiB", 2**20)
    w = max([len(b.label) for b in budgets] + [7])
    head = (f"{'setting':<{w}}  {'trainable':>13}  {'weights':>8}  {'grads':>8}  {'Adam':>8}  "
            f"{'total ' + unit:>9}")
    rows = [f"{b.label:<{w}}  {b.trainable_params:>13,}  {b.weights_bytes / div:>8.2f}  {b.grads_bytes / div:>8.2f}  "
            f"{b.optimizer_bytes / div:>8.2f}  {b.total_bytes / div:>9.2f}" for b in budgets]
    return "\n".join([head, "-" * len(head)] + rows)


class track_peak:
    """Context manager: the peak CUDA memory allocated inside the block (`.bytes`; None without a CUDA GPU)."""

    def __init__(self, label: str = ""):
        self.label = label
        self.bytes: int | None = None

    def __enter__(self) -> track_peak:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()

    def describe(self) -> str:
        name = f"{self.label}: " if self.label else ""
        if self.bytes is None:
            return f"{name}peak GPU memory not measured (no CUDA GPU here; on Colab this shows the real peak)"
        return f"{name}peak GPU memory {self.bytes / GiB:.2f} GiB"
