"""A run tuned to a GPU: the preset (nbkit.training.presets) applied to a TrainConfig and checked by the planner; with
PRESET="auto" adjusted until the plan fits (memory savers added, gradient checkpointing dropped when the run fits
without it). `preview` plans a run on a GPU you are not on yet (a T4 from a CPU session); `describe` lists what
each preset sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.config import TrainConfig
from nbkit.env.runtime import GPUS, Runtime
from nbkit.memory import planner, sdxlarch
from nbkit.training.presets import HOST_RAM_DEEPSPEED_GB, NAMES, accelerate_config_path, choose, settings


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
    from nbkit.env.runtime import detect

    rt = rt or detect()
    auto, keep = preset == "auto", set(keep)
    name = choose(rt) if auto else preset
    sdxl = planner.arch_of(model if model is not None else cfg.model).sdxl  # SDXL's own presets (presets doc)
    base = dataclasses.replace(cfg, **{k: v for k, v in settings(name, rt, cfg, sdxl).items() if k not in keep})
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
        # faster when it fits without
        if auto and p.fits and base.gradient_checkpointing and "gradient_checkpointing" not in keep:
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


def preview(cfg: TrainConfig, gpu: str = "T4", model: str = "sd15", resolution: int | None = None,
            preset: str = "auto") -> Tuned:
    """The same run with `model` (default SD 1.5; "sdxl": SDXL base 1.0; planned from their configs: no download)
    at `resolution` (default: the model's, 512 px or SDXL's 1024) on a GPU of GPUS: what a CPU-only session would
    meet on Colab (on "2xT4": one DDP process per GPU)."""
    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r}: choose one of {', '.join(GPUS)}.")
    rt = GPUS[gpu]
    resolution = resolution or (sdxlarch.RESOLUTION if planner.arch_of(model).sdxl else 512)
    return tune(dataclasses.replace(cfg, model=model, resolution=resolution), preset, rt, num_processes=rt.gpu_count)


def describe(rt: Runtime | None = None) -> str:
    """A table of every preset's settings (for a fp16 GPU, or for `rt`)."""
    rt = rt or Runtime("local", "cuda", "GPU", 1, 16.0, False)
    keys = ("mixed_precision", "use_8bit_adam", "gradient_checkpointing", "optimizer_in_backward", "deepspeed_config")
    lines = ["| preset | method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in NAMES:
        for label, c in (("DreamBooth + TE", TrainConfig(train_text_encoder=True)),
                         ("LoRA", TrainConfig(method="lora"))):
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
