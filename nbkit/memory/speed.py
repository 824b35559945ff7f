"""Planned seconds on a GPU, from the floating-point work of each step: until a T4 has been measured
(benchmarks/RESULTS.md has no T4 row yet), the time a notebook takes there is planned, never measured, and every
figure made here is labelled "planned".

The work of SD 1.5 at 512 px was counted once with `torch.utils.flop_counter` on the meta device (no weights;
`python -m nbkit.memory.speed` counts again): a UNet forward is 0.803 TFLOP per picture, a VAE decode 2.51, a VAE
encode 1.12 (the text encoder's 0.013 is left out). A training step runs the UNet forward and backward (the backward
about twice the forward) per picture, one more forward with gradient checkpointing; with the UNet frozen (LoRA,
textual inversion) the backward still runs through it for the input gradients (about one forward). Sampling runs
the UNet twice per step (classifier-free guidance) and the VAE decoder once per picture. The optimizer step streams
every trained parameter's weight, gradient and state through memory.

The GPU's sustained rates are assumptions, not measurements: a T4 at 8 TFLOP/s of fp16 (an eighth of its 65 TFLOP/s
tensor-core peak) and 250 of its 320 GB/s, plus 0.05 s of launch overhead per training step. Replace them with the
first measured T4 row.
"""

from __future__ import annotations

from dataclasses import dataclass

UNET_TFLOP = 0.803  # one UNet forward, one picture, 512 px (64x64 latent)
VAE_DECODE_TFLOP = 2.51  # one picture, 512 px
VAE_ENCODE_TFLOP = 1.12
COUNTED = "2026-12-02, torch.utils.flop_counter.FlopCounterMode on the meta device (data/sd15-arch)"
ADAM_BYTES = 28  # per trained parameter and step: fp32 weight read + write, gradient, two fp32 moments read + write
ADAM_8BIT_BYTES = 16  # the same with 8-bit moments


@dataclass(frozen=True)
class GpuSpeed:
    tflops: float  # sustained fp16 rate (an assumption until measured)
    bandwidth_gbs: float  # sustained memory bandwidth (an assumption until measured)
    step_overhead_s: float  # kernel launches, the data step, the scaler: per training step
    source: str


SPEEDS = {"T4": GpuSpeed(8.0, 250.0, 0.05, "assumed: 8 of the T4's 65 TFLOP/s fp16 peak, 250 of its 320 GB/s")}


def _scale(resolution: int) -> float:
    return (resolution / 512) ** 2


def train_step_seconds(method: str, pictures: int, trained_params: int, *, checkpointing: bool = False,
                       eight_bit: bool = True, resolution: int = 512, gpu: str = "T4") -> float:
    """Planned seconds of one training step: `pictures` per step (prior preservation doubles them), `method` one
    of dreambooth / lora / textual_inversion, `trained_params` what the optimizer updates."""
    s = SPEEDS[gpu]
    passes = (3.0 if method == "dreambooth" else 2.0) + (1.0 if checkpointing else 0.0)
    compute = passes * UNET_TFLOP * _scale(resolution) * pictures / s.tflops
    optimizer = trained_params * (ADAM_8BIT_BYTES if eight_bit else ADAM_BYTES) / (s.bandwidth_gbs * 1e9)
    return compute + optimizer + s.step_overhead_s


def sample_seconds(images: int, steps: int, *, resolution: int = 512, guidance: bool = True,
                   gpu: str = "T4") -> float:
    """Planned seconds to draw `images` pictures of `steps` inference steps each (fp16)."""
    s = SPEEDS[gpu]
    unet = (2 if guidance else 1) * UNET_TFLOP * steps
    return images * (unet + VAE_DECODE_TFLOP) * _scale(resolution) / s.tflops


def encode_seconds(images: int, *, resolution: int = 512, gpu: str = "T4") -> float:
    """Planned seconds to encode `images` pictures to latents (once per run: latents are cached)."""
    return images * VAE_ENCODE_TFLOP * _scale(resolution) / SPEEDS[gpu].tflops


def count(resolution: int = 512) -> dict[str, float]:
    """TFLOP of a UNet forward, a VAE decode and encode of one SD 1.5 picture, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nbkit.models.sd15 import build_parts

    parts = build_parts("meta")
    side = resolution // 8
    out = {}
    with torch.device("meta"):
        latent, image = torch.randn(1, 4, side, side), torch.randn(1, 3, resolution, resolution)
        runs = {"unet": lambda: parts.unet(latent, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 768)),
                "vae_decode": lambda: parts.vae.decode(latent), "vae_encode": lambda: parts.vae.encode(image)}
        for name, run in runs.items():
            with FlopCounterMode(display=False) as fc:
                run()
            out[name] = fc.get_total_flops() / 1e12
    return out


if __name__ == "__main__":
    print(count())
