"""Memory presets: the settings that make a run fit a GPU of 8, 12, 16, 24 or 40+ GB, and run as fast as it allows.

A preset is picked from the detected GPU (its memory, and whether it computes in bf16: T4 and P100 do not) or
named in a notebook's `PRESET` parameter. `tune()` applies it to a TrainConfig and asks `nbkit.planner` whether
the run fits; with `PRESET = "auto"` it also adjusts: adds memory savers until the plan fits, and drops gradient
checkpointing (20-30% slower) when the plan fits without it. With a named preset it changes nothing and says
what to change.

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
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from . import planner
from .config import TrainConfig
from .paths import CONFIGS_DIR
from .runtime import GPUS, Runtime, resolve_precision  # presets.GPUS: its old name

NAMES = ("cpu", "8gb", "8gb-deepspeed", "12gb", "16gb", "24gb", "40gb")
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


def settings(name: str, rt: Runtime, cfg: TrainConfig | None = None) -> dict:
    """The TrainConfig fields preset `name` sets on this runtime, for this run (method, text encoder, batch)."""
    if name not in NAMES:
        raise ValueError(f"PRESET={name!r}: choose 'auto' or one of {', '.join(NAMES)}.")
    cfg = cfg or TrainConfig()
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


@dataclass
class Tuned:
    """A config fitted to the GPU: which preset, what changed and why, and the memory plan."""

    config: TrainConfig
    preset: str
    plan: planner.Plan
    changes: list[str] = field(default_factory=list)  # what tune() changed beyond the preset, and why
    advice: list[str] = field(default_factory=list)  # what to change by hand (named preset, or still too big)

    def __str__(self) -> str:
        s = self.config
        head = (f"preset {self.preset!r}: precision {s.mixed_precision}, 8-bit AdamW {s.use_8bit_adam}, "
                f"checkpointing {s.gradient_checkpointing}, optimizer in backward {s.optimizer_in_backward}, "
                f"batch {s.train_batch_size} x {s.gradient_accumulation_steps} accumulation"
                + (", DeepSpeed ZeRO-2 offload" if s.deepspeed_config else ""))
        return "\n".join([head] + [f"  changed: {c}" for c in self.changes] + [f"  advice: {a}" for a in self.advice])

    def _repr_markdown_(self) -> str:
        return "\n\n".join([f"`{line}`" if i == 0 else line for i, line in enumerate(str(self).splitlines())]
                           + [self.plan._repr_markdown_()])


def tune(cfg: TrainConfig, preset: str = "auto", rt: Runtime | None = None, model=None,
         num_processes: int = 1, headroom: float = 0.05, keep=()) -> Tuned:
    """Apply a preset to `cfg` and check it with the planner (see the module doc).

    model: what to plan for (default cfg.model; loaded SDParts are counted directly). keep: fields the user set
    explicitly; neither the preset nor the automatic adjustments change them.
    """
    from .runtime import detect

    rt = rt or detect()
    auto = preset == "auto"
    name = choose(rt) if auto else preset
    keep = set(keep)
    base = dataclasses.replace(cfg, **{k: v for k, v in settings(name, rt, cfg).items() if k not in keep})
    if name == "8gb-deepspeed" and base.train_text_encoder:
        raise ValueError("The 8gb-deepspeed preset trains the UNet only (accelerate prepares one model for "
                         "DeepSpeed). To train the text encoder on 8 GB, use PRESET='8gb' (optimizer in backward).")
    gpu = rt.gpu_memory_gb if rt.device == "cuda" else None
    kw = dict(gpu_gb=gpu, device=rt.device, bf16=rt.bf16, num_processes=num_processes)

    def make(c):
        return planner.plan(c, model, **kw)

    p = make(base)
    changes: list[str] = []
    advice: list[str] = []
    if gpu is not None:
        if auto and not p.fits:  # add memory savers, cheapest first, until the plan fits
            for change in planner.remedies(base):
                if not change.automatic or keep & set(change.settings):
                    continue
                trial = planner.apply_change(base, change)
                tp = make(trial)
                if tp.needed < p.needed:
                    base, p = trial, tp
                    changes.append(f"{change.why} -> {p.needed / 2**30:.1f} GiB")
                if p.fits:
                    break
        if auto and p.fits and base.gradient_checkpointing and "gradient_checkpointing" not in keep:  # faster when it fits without
            trial = dataclasses.replace(base, gradient_checkpointing=False)
            tp = make(trial)
            if tp.fits and tp.headroom >= headroom:
                base, p = trial, tp
                changes.append(f"gradient checkpointing off: fits without it ({p.needed / 2**30:.1f} GiB), "
                               "20-30% faster")
        if not p.fits:
            for change, cp in planner.advise(base, model, **kw):
                verdict = "fits" if cp.fits else "still too big"
                advice.append(f"{change.why}: {cp.needed / 2**30:.1f} GiB ({verdict}); set "
                              + ", ".join(f"{k}={v!r}" for k, v in change.settings.items()))
    if base.optimizer_in_backward:
        ok, why = planner.in_backward_active(base, num_processes)
        if not ok:
            advice.append(f"optimizer_in_backward will fall back to the normal optimizer: {why}.")
    if base.deepspeed_config:
        advice.append(f"DeepSpeed ZeRO-2 offload keeps the optimizer on the CPU: the machine needs about "
                      f"{HOST_RAM_DEEPSPEED_GB} GB of RAM, `pip install deepspeed`, and runs best with "
                      f"`accelerate launch --config_file {accelerate_config_path()} -m nbkit train ...`.")
    return Tuned(base, name, p, changes, advice)


def preview(cfg: TrainConfig, gpu: str = "T4", model: str = "sd15", resolution: int = 512,
            preset: str = "auto") -> Tuned:
    """The same run with `model` (default SD 1.5, planned from its configs: no download) at `resolution` on a
    GPU of GPUS: what a CPU-only session would meet on Colab (on "2xT4": one DDP process per GPU)."""
    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r}: choose one of {', '.join(GPUS)}.")
    rt = GPUS[gpu]
    return tune(dataclasses.replace(cfg, model=model, resolution=resolution), preset, rt, num_processes=rt.gpu_count)


def describe(rt: Runtime | None = None) -> str:
    """A table of every preset's settings (for a fp16 GPU, or for `rt`)."""
    rt = rt or Runtime("local", "cuda", "GPU", 1, 16.0, False)
    keys = ("mixed_precision", "use_8bit_adam", "gradient_checkpointing", "optimizer_in_backward", "deepspeed_config")
    lines = ["| preset | method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in NAMES:
        for label, c in (("DreamBooth + TE", TrainConfig(train_text_encoder=True)), ("LoRA", TrainConfig(method="lora"))):
            s = settings(name, rt if name != "cpu" else Runtime("local", "cpu", None, 0, 0.0, False), c)
            vals = [Path(str(s[k])).name if k == "deepspeed_config" and s[k] else str(s[k]) for k in keys]
            lines.append(f"| {name} | {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def attention_backends(parts) -> dict[str, str]:
    """Which attention implementation each network uses (SDPA expected: diffusers' AttnProcessor2_0 and
    transformers' 'sdpa')."""
    procs = {type(p).__name__ for p in parts.unet.attn_processors.values()}
    te = getattr(parts.text_encoder.config, "_attn_implementation", None) or "eager"
    return {"unet": ", ".join(sorted(procs)), "text_encoder": te}
