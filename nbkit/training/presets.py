"""Memory presets: the settings that make a run fit a GPU of 8, 12, 16, 24 or 40+ GB, and run as fast as it allows.

A preset is picked from the detected GPU (its memory, and whether it computes in bf16: T4 and P100 do not) or
named in a notebook's `PRESET` parameter. `nbkit.memory.tuning.tune()` applies it to a TrainConfig and asks
`nbkit.memory.planner` whether the run fits; with `PRESET = "auto"` it also adjusts: adds memory savers until the plan
fits, and drops gradient checkpointing (20-30% slower) when the plan fits without it. With a named preset it changes
nothing and says what to change.

What every preset keeps on (they cost nothing): mixed precision with **fp32 trainable weights** (fp16 on
T4/P100, bf16 on Ampere and newer); **SDPA attention** (`scaled_dot_product_attention`, the default processor of
diffusers' UNet with torch 2, and of transformers' CLIP: flash / memory-efficient kernels, no attention matrix
kept; `attention_backends()` shows it); **cached latents** (the VAE encodes the pictures once and leaves the
GPU); **precomputed prompt embeddings** when the text encoder is frozen; gradients freed with
`zero_grad(set_to_none=True)`. What the presets switch: 8-bit AdamW (bitsandbytes), gradient checkpointing,
the optimizer in backward, DeepSpeed ZeRO-2 with CPU offload (configs/), and gradient accumulation.

| preset | for | settings |
|---|---|---|
| `cpu` | no GPU | fp32, nothing else needed |
| `8gb` | 8-10 GB | 8-bit AdamW, checkpointing, optimizer in backward (no clipping, no accumulation) |
| `8gb-deepspeed` | 8 GB, UNet only | DeepSpeed ZeRO-2, optimizer state on the CPU (~25 GB host RAM), checkpointing |
| `12gb` | 11-14 GB | 8-bit AdamW, checkpointing |
| `16gb` | T4, P100, V100-16 | 8-bit AdamW, checkpointing when the text encoder trains or 2+ samples per step |
| `24gb` | 20-36 GB | AdamW, checkpointing when the text encoder trains with 2+ samples per step |
| `40gb` | 36 GB and more | AdamW, no checkpointing |

**SDXL** (`sdxl=True`; nbkit.memory.tuning.tune detects it from the model): 1024 px pictures and a 2.6 B-parameter
UNet. LoRA on every GPU preset: fp16/bf16, 8-bit AdamW and gradient checkpointing, latents and prompt embeddings
cached (a 16 GB T4 fits it: `nbkit.memory.planner`); `40gb` leaves checkpointing to the planner (tune drops it when
the run fits without). Full DreamBooth of SDXL's UNet is refused under 20 GB (its fp32 weights, gradients and
8-bit AdamW state alone are ~24 GiB): `24gb` trains it with 8-bit AdamW, checkpointing and the optimizer in backward
(the gradients one at a time), `40gb` with 8-bit AdamW and checkpointing.
"""

from __future__ import annotations

from pathlib import Path

from nbkit.config import ConfigError, TrainConfig
from nbkit.env.runtime import GPUS, Runtime, resolve_precision  # noqa: F401 - importable from here too
from nbkit.paths import CONFIGS_DIR

NAMES = ("cpu", "8gb", "8gb-deepspeed", "12gb", "16gb", "24gb", "40gb")
SDXL_FULL_MIN_PRESET = "24gb"  # the smallest preset that trains SDXL's whole UNet (DreamBooth)
HOST_RAM_DEEPSPEED_GB = 25  # what the diffusers DreamBooth README measured for ZeRO-2 + CPU offload at 8 GB


def deepspeed_config_path() -> Path:
    """The DeepSpeed JSON of the 8gb-deepspeed preset (ZeRO-2, optimizer offloaded to the CPU)."""
    return CONFIGS_DIR / "deepspeed" / "zero2_offload.json"


def accelerate_config_path() -> Path:
    """`accelerate launch --config_file` for the 8gb-deepspeed preset."""
    return CONFIGS_DIR / "accelerate" / "deepspeed_zero2_offload.yaml"


def choose(rt: Runtime) -> str:
    """The preset for a runtime: by the first GPU's memory (GiB as the driver reports it: a T4 shows ~14.7)."""
    if rt.device != "cuda":
        return "cpu"
    gb = rt.gpu_memory_gb
    if gb < 10.5:
        return "8gb"
    if gb < 14:
        return "12gb"
    if gb < 20:
        return "16gb"
    if gb < 36:
        return "24gb"
    return "40gb"


def settings(name: str, rt: Runtime, cfg: TrainConfig | None = None, sdxl: bool = False) -> dict:
    """The TrainConfig fields preset `name` sets on this runtime, for this run (method, text encoder, batch);
    sdxl: for an SDXL model (see the module doc; full DreamBooth under 20 GB: ConfigError saying what fits)."""
    if name not in NAMES:
        raise ValueError(f"PRESET={name!r}: choose 'auto' or one of {', '.join(NAMES)}.")
    cfg = cfg or TrainConfig()
    if sdxl:
        return _sdxl_settings(name, rt, cfg)
    full = cfg.method == "dreambooth"  # every UNet weight trains (LoRA and TI train a few MB)
    te = full and cfg.train_text_encoder
    two = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1) >= 2
    s = dict(mixed_precision=resolve_precision("auto", rt), cache_latents=True, use_8bit_adam=False,
             gradient_checkpointing=False, optimizer_in_backward=False, deepspeed_config="")
    if name == "cpu":
        return s
    if name == "8gb":
        s.update(use_8bit_adam=True, gradient_checkpointing=True)
        if full:
            s.update(optimizer_in_backward=True, max_grad_norm=0.0, gradient_accumulation_steps=1)
    elif name == "8gb-deepspeed":
        s.update(gradient_checkpointing=True, deepspeed_config=str(deepspeed_config_path()),
                 gradient_accumulation_steps=1, checkpointing_steps=0)  # ZeRO's state pickles: no resumable checkpoints
    elif name == "12gb":
        s.update(use_8bit_adam=True, gradient_checkpointing=full)
    elif name == "16gb":
        s.update(use_8bit_adam=True, gradient_checkpointing=full and (te or two))
    elif name == "24gb":
        s.update(gradient_checkpointing=te and two)
    return s


def _sdxl_settings(name: str, rt: Runtime, cfg: TrainConfig) -> dict:
    full = cfg.method == "dreambooth"
    s = dict(mixed_precision=resolve_precision("auto", rt), cache_latents=True, use_8bit_adam=False,
             gradient_checkpointing=False, optimizer_in_backward=False, deepspeed_config="")
    if name == "cpu":
        return s
    if full and NAMES.index(name) < NAMES.index(SDXL_FULL_MIN_PRESET):
        raise ConfigError(
            f"Full DreamBooth of SDXL does not fit the {name} preset's GPU: its 2.6 B-parameter UNet needs ~24 GiB in "
            "fp32 weights, gradients and 8-bit AdamW state before any activation. On this GPU use method='lora' (SDXL "
            "LoRA fits a 16 GB T4 with 8-bit AdamW and gradient checkpointing), or a GPU of 24 GB or more with "
            f"PRESET='{SDXL_FULL_MIN_PRESET}' (8-bit AdamW, checkpointing, optimizer in backward) or '40gb'.")
    s.update(use_8bit_adam=True, gradient_checkpointing=True)
    if name == "40gb" and not full:
        s.update(use_8bit_adam=False, gradient_checkpointing=False)  # LoRA: a few MB of state; tune() checks it
    if full and name == "24gb":
        s.update(optimizer_in_backward=True, max_grad_norm=0.0, gradient_accumulation_steps=1)
    return s


def memory_settings(rt: Runtime, train_text_encoder: bool = False, with_prior_preservation: bool = False,
                    method: str = "dreambooth", sdxl: bool = False) -> dict:
    """TrainConfig memory settings that fit the detected GPU (a 16 GB T4/P100 is the design point): this module's
    table for three keys (`tune()` also plans the run and adjusts it).

    Training the text encoder adds its weights, gradients, optimizer state and activations; prior preservation
    doubles the images per step (and so the activations): both can turn gradient checkpointing on. sdxl: for an
    SDXL model (LoRA: 8-bit AdamW and checkpointing on a T4; full DreamBooth under 20 GB: ConfigError).
    """
    cfg = TrainConfig(method=method, train_text_encoder=train_text_encoder,
                      with_prior_preservation=with_prior_preservation)
    s = settings(choose(rt), rt, cfg, sdxl)
    return {k: s[k] for k in ("mixed_precision", "use_8bit_adam", "gradient_checkpointing")}


def describe_settings(settings: dict, rt: Runtime) -> str:
    """Memory settings (memory_settings) in words."""
    words = []
    for key, value in settings.items():
        if key == "mixed_precision":
            p = resolve_precision(value, rt, warn=False)
            words.append("full fp32" if p == "no" else f"{p} mixed precision (trainable weights stay fp32)")
        elif key == "use_8bit_adam":
            words.append("8-bit AdamW" if value else "AdamW")
        elif key == "gradient_checkpointing":
            words.append("gradient checkpointing" if value else "no gradient checkpointing")
        else:
            words.append(f"{key}={value}")
    return ", ".join(words)
