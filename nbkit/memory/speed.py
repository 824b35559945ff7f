"""Planned seconds on a GPU, from the floating-point work of each step: until a T4 has been measured
(benchmarks/RESULTS.md has no T4 row yet), the time a notebook takes there is planned, never measured, and every
figure made here is labelled "planned".

The work was counted once with `torch.utils.flop_counter` on the meta device (no weights; `python -m
nbkit.memory.speed` counts again), per picture: SD 1.5 at 512 px, a UNet forward 0.803 TFLOP, a VAE decode 2.51, a
VAE encode 1.12 (the text encoder's 0.013 is left out); SDXL base at 1024 px, 6.76, 10.47 and 4.88, its VAE in fp32.
A training step runs the UNet forward and backward (the backward about twice the forward) per picture, one more
forward with gradient checkpointing; with the UNet frozen (LoRA, textual inversion) the backward still runs through
it for the input gradients (about one forward). Sampling runs the UNet twice per step (classifier-free guidance) and
the VAE decoder once per picture. The optimizer step streams every trained parameter's weight, gradient and state
through memory.

The GPU's sustained rates are assumptions, not measurements: a T4 at 8 TFLOP/s of fp16 (an eighth of its 65 TFLOP/s
tensor-core peak), 4 TFLOP/s of fp32 (half its 8.1 peak) and 250 of its 320 GB/s, plus 0.05 s of launch overhead per
training step. Replace them with the first measured T4 row.
"""

from __future__ import annotations

from dataclasses import dataclass

UNET_TFLOP = 0.803  # SD 1.5: one UNet forward, one picture, 512 px (64x64 latent)
VAE_DECODE_TFLOP = 2.51  # one picture, 512 px
VAE_ENCODE_TFLOP = 1.12
COUNTED = "2026-12-02, torch.utils.flop_counter.FlopCounterMode on the meta device (data/sd15-arch, data/sdxl-arch)"


@dataclass(frozen=True)
class Work:
    """TFLOP per picture at the model's own size."""

    unet: float
    decode: float
    encode: float
    resolution: int
    vae_fp32: bool = False  # the VAE runs in fp32 (SDXL's force_upcast)


WORK = {"sd15": Work(UNET_TFLOP, VAE_DECODE_TFLOP, VAE_ENCODE_TFLOP, 512),
        "sdxl": Work(6.76, 10.47, 4.88, 1024, vae_fp32=True)}
ADAM_BYTES = 28  # per trained parameter and step: fp32 weight read + write, gradient, two fp32 moments read + write
ADAM_8BIT_BYTES = 16  # the same with 8-bit moments


@dataclass(frozen=True)
class GpuSpeed:
    tflops: float  # sustained fp16 rate (an assumption until measured)
    fp32_tflops: float  # sustained fp32 rate (an assumption until measured)
    bandwidth_gbs: float  # sustained memory bandwidth (an assumption until measured)
    step_overhead_s: float  # kernel launches, the data step, the scaler: per training step
    source: str


SPEEDS = {"T4": GpuSpeed(8.0, 4.0, 250.0, 0.05,
                         "assumed: 8 of the T4's 65 TFLOP/s fp16 peak, 4 of its 8.1 fp32, 250 of its 320 GB/s")}


def _scale(resolution: int | None, w: Work) -> float:
    return ((resolution or w.resolution) / w.resolution) ** 2


def _vae_seconds(tflop: float, w: Work, s: GpuSpeed) -> float:
    return tflop / (s.fp32_tflops if w.vae_fp32 else s.tflops)


def train_step_seconds(method: str, pictures: int, trained_params: int, *, checkpointing: bool = False,
                       eight_bit: bool = True, resolution: int | None = None, gpu: str = "T4",
                       model: str = "sd15") -> float:
    """Planned seconds of one training step: `pictures` per step (prior preservation doubles them), `method` one
    of dreambooth / lora / textual_inversion, `trained_params` what the optimizer updates, `model` sd15 or sdxl."""
    s, w = SPEEDS[gpu], WORK[model]
    passes = (3.0 if method == "dreambooth" else 2.0) + (1.0 if checkpointing else 0.0)
    compute = passes * w.unet * _scale(resolution, w) * pictures / s.tflops
    optimizer = trained_params * (ADAM_8BIT_BYTES if eight_bit else ADAM_BYTES) / (s.bandwidth_gbs * 1e9)
    return compute + optimizer + s.step_overhead_s


def sample_seconds(images: int, steps: int, *, resolution: int | None = None, guidance: bool = True,
                   gpu: str = "T4", model: str = "sd15") -> float:
    """Planned seconds to draw `images` pictures of `steps` inference steps each (UNet in fp16)."""
    s, w = SPEEDS[gpu], WORK[model]
    unet = (2 if guidance else 1) * w.unet * steps / s.tflops
    return images * (unet + _vae_seconds(w.decode, w, s)) * _scale(resolution, w)


def encode_seconds(images: int, *, resolution: int | None = None, gpu: str = "T4", model: str = "sd15") -> float:
    """Planned seconds to encode `images` pictures to latents (once per run: latents are cached)."""
    s, w = SPEEDS[gpu], WORK[model]
    return images * _vae_seconds(w.encode, w, s) * _scale(resolution, w)


def count(model: str = "sd15") -> dict[str, float]:
    """TFLOP of a UNet forward, a VAE decode and encode of one picture at the model's size, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    side = WORK[model].resolution
    if model == "sdxl":
        from nbkit.memory import sdxlarch

        nets = sdxlarch.build("meta")
        unet, vae, width = nets.unet, nets.vae, 2048
        extra = sdxlarch.added_conditions(sdxlarch.configs()["unet"], 1)
    else:
        from nbkit.models.sd15 import build_parts

        parts = build_parts("meta")
        unet, vae, width, extra = parts.unet, parts.vae, 768, {}
    out = {}
    with torch.device("meta"):
        latent, image = torch.randn(1, 4, side // 8, side // 8), torch.randn(1, 3, side, side)
        runs = {"unet": lambda: unet(latent, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, width),
                                     **extra),
                "vae_decode": lambda: vae.decode(latent), "vae_encode": lambda: vae.encode(image)}
        for name, run in runs.items():
            with FlopCounterMode(display=False) as fc:
                run()
            out[name] = fc.get_total_flops() / 1e12
    return out


if __name__ == "__main__":
    print({m: count(m) for m in WORK})
