"""Predict the peak GPU memory of a training run before it starts, show the breakdown, and say what to change.

The peak of a step is: the weights on the GPU (each part in its precision) + the optimizer state (AdamW: two fp32
numbers per trained parameter; bitsandbytes 8-bit AdamW: two bytes, and fp32 for tensors under 4,096 elements) +
with use_ema, the average of the trained weights (fp32) + the most that the step itself holds at once: gradients
(fp32, one per trained parameter; only one parameter's at a time with the optimizer in backward) and activations
(what the forward pass keeps for the backward pass; with gradient checkpointing only each block's input, the rest
recomputed), plus autocast's half-precision copies of fp32 weights. Weights and optimizer state come from parameter
counts; the step's part comes from an activation model calibrated on `nbkit.memory.memtrace`, which counts every
tensor a step of the same architecture allocates (SD 1.5 at 512 px simulated on a CPU with fake tensors). Per
sample, activations grow linearly with the latent's pixels (attention runs through SDPA's flash / memory-efficient
kernels, which keep no attention matrix), so the model is `fixed + samples x per_sample x (pixels / reference
pixels)` (`nbkit.memory.actmodel`, which also adds what the CPU cannot show: CUDA autocast's fp32 norms, DDP's
buckets).

On a GPU, `torch.cuda.max_memory_allocated` should match the prediction; `memory_reserved` adds the caching
allocator's slack, and the CUDA context (~0.4 GiB, outside PyTorch) comes on top: `fits` accounts for both.
The benchmark (`benchmarks/bench_memory.py`) checks the prediction against measured peaks on a real GPU.

Recalibrate after changing the training loop: `python -m nbkit calibrate --spec sd15` (minutes) and
`--spec offline --real` (a few minutes; `nbkit.memory.memtrace.calibrate`); stored in `data/memory-calibration.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.config import TrainConfig
from nbkit.env import runtime
from nbkit.memory import actmodel
from nbkit.memory.actmodel import CALIBRATION_FILE, calibration_for
from nbkit.training.optim import BNB_MIN_8BIT_SIZE, adam_state_bytes, in_backward_active
from nbkit.training.savers import Change, remedies
from nbkit.units import GiB, MiB

# Terms the CPU simulation cannot see, from the published anchors (diffusers PR #2039: 11,124 MiB; the T4 table
# of the DreamBooth 16 GB recipe: 9.92 GB, ...) until benchmarks/RESULTS.md has measured them:
CUDA_CONTEXT = int(0.45 * GiB)  # the CUDA context and kernels: outside torch's allocator, inside the GPU's memory
CUDA_WORKSPACE = int(0.5 * GiB)  # cuDNN / cuBLAS workspaces (allocated through torch's allocator)
ALLOCATOR_ROUNDING = 0.03  # reserved / allocated - 1 from block rounding
# plus, in reserved: freed activation blocks that gradients and later steps cannot reuse, as a multiple of one
# step's calibrated (CPU) activation volume (2.0 fits the published T4 table within 3%: 9.92 / 10.4 / 11.17 /
# 13.67 GB; those are CUDA runs, fp32 norms included, so the volume is taken before actmodel's norm factor)
ALLOCATOR_FRAGMENTATION = 2.0
BNB_MIN_8BIT = BNB_MIN_8BIT_SIZE  # bitsandbytes keeps fp32 state for tensors smaller than this
SD15_IDS = ("stable-diffusion-v1-5", "stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5",
            "CompVis/stable-diffusion")


# ----------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Arch:
    """What the planner needs to know about a model: its parameter counts and its activation calibration."""

    name: str
    fingerprint: str
    unet: int
    text_encoder: int
    vae: int
    token_embedding: int  # elements of the text encoder's token-embedding matrix (TI trains it all)
    lora_per_rank_unet: int  # LoRA parameters per unit of rank on the UNet's attention projections
    lora_per_rank_te: int  # ... on the text encoder's attention projections
    largest: dict  # part -> elements of its largest parameter (the optimizer-in-backward's gradient peak)
    small: dict  # part -> elements in parameters under 4,096 elements (8-bit Adam keeps them in fp32)
    vae_factor: int  # image side / latent side
    calibration: dict = field(default_factory=dict, compare=False)
    calibration_source: str = "none"


def _lora_per_rank(module, targets: list[str]) -> int:
    import torch

    n = 0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += m.in_features + m.out_features
    return n


def arch_from_parts(parts, name: str | None = None) -> Arch:
    """The Arch of loaded (or meta-built) parts."""
    from nbkit.training.methods import LORA_TARGETS_TEXT, LORA_TARGETS_UNET

    def count(m):
        return sum(p.numel() for p in m.parameters()) if m is not None else 0

    def largest(m):
        return max((p.numel() for p in m.parameters()), default=0)

    def small(m):
        return sum(p.numel() for p in m.parameters() if p.numel() < BNB_MIN_8BIT)

    unet_cfg = dict(parts.unet.config)
    te_cfg = parts.text_encoder.config.to_dict()
    fp = actmodel.fingerprint(unet_cfg, te_cfg)
    vae_blocks = parts.vae.config.block_out_channels if parts.vae is not None and hasattr(parts.vae, "config") else None
    cal, source = calibration_for(fp, count(parts.unet))
    return Arch(
        name=name or _guess_name(fp), fingerprint=fp, unet=count(parts.unet), text_encoder=count(parts.text_encoder),
        vae=count(parts.vae) if hasattr(parts.vae, "config") else 0,
        token_embedding=parts.text_encoder.get_input_embeddings().weight.numel(),
        lora_per_rank_unet=_lora_per_rank(parts.unet, LORA_TARGETS_UNET),
        lora_per_rank_te=_lora_per_rank(parts.text_encoder, LORA_TARGETS_TEXT),
        largest={"unet": largest(parts.unet), "text_encoder": largest(parts.text_encoder)},
        small={"unet": small(parts.unet), "text_encoder": small(parts.text_encoder)},
        vae_factor=2 ** (len(vae_blocks) - 1) if vae_blocks else 8, calibration=cal, calibration_source=source,
    )


@functools.lru_cache(maxsize=8)
def _arch_of_spec(spec: str) -> Arch:
    from nbkit.models.sd15 import build_parts

    name = "sd15" if Path(spec).resolve() == _sd15_spec().resolve() else None
    return arch_from_parts(build_parts("meta", spec=spec), name)


def _sd15_spec() -> Path:
    from nbkit.models.sd15 import SPEC

    return SPEC


def arch_of(model) -> Arch:
    """The Arch of `model`: loaded SDParts, "offline", "sd15", SD 1.x hub ids, or a local diffusers folder.

    Parameters are counted on the meta device from the configs: nothing is downloaded or allocated.
    """
    from nbkit.models.parts import SDParts, resolve

    if isinstance(model, Arch):
        return model
    if isinstance(model, SDParts):
        return arch_from_parts(model)
    model = str(model)
    if model == "sd15" or any(s in model for s in SD15_IDS):
        return _arch_of_spec(str(_sd15_spec()))
    path = Path(resolve(model))
    if (path / "unet" / "config.json").exists():
        return _arch_of_spec(str(path))
    raise ValueError(f"Cannot plan for model {model!r}: give 'offline', 'sd15' (or an SD 1.x hub id), a local "
                     "diffusers folder, or loaded parts (nbkit.load_parts(...)).")


def _guess_name(fp: str) -> str:
    return actmodel.load_calibrations().get(fp, {}).get("name", f"model-{fp[:6]}")


# ------------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """A predicted peak, its parts, and whether it fits the GPU."""

    rows: list[tuple[str, int]]  # (what, bytes) summing to `allocated`
    allocated: int  # predicted torch.cuda.max_memory_allocated()
    capacity: int | None  # the GPU's memory (bytes); None on a CPU
    settings: dict  # the settings the plan was made for
    notes: list[str] = field(default_factory=list)
    slack: int = 0  # the caching allocator's: reserved - allocated
    context: int = 0  # the CUDA context (outside torch)

    @property
    def reserved(self) -> int:
        """Predicted torch.cuda.max_memory_reserved(): allocated plus the caching allocator's slack."""
        return self.allocated + self.slack

    @property
    def needed(self) -> int:
        """What the GPU must have: reserved plus the CUDA context."""
        return self.reserved + self.context

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.needed <= self.capacity

    @property
    def headroom(self) -> float:
        """Free fraction of the GPU at the peak (negative: does not fit)."""
        return 1.0 if self.capacity is None else 1 - self.needed / self.capacity

    @property
    def unit(self) -> tuple[str, int]:
        """GiB for real models, MiB for the small offline one."""
        return ("GiB", GiB) if self.needed >= GiB / 2 else ("MiB", MiB)

    def table(self) -> str:
        """A markdown table of the breakdown."""
        u, d = self.unit
        lines = [f"| part | {u} |", "|---|---:|"]
        lines += [f"| {what} | {b / d:.2f} |" for what, b in self.rows]
        lines.append(f"| **peak allocated (predicted)** | **{self.allocated / d:.2f}** |")
        if self.context:
            lines.append(f"| + allocator slack and CUDA context | {(self.needed - self.allocated) / d:.2f} |")
        cap = f"{self.capacity / GiB:.1f} GiB GPU" if self.capacity else "no GPU limit (CPU)"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"| **needed** | **{self.needed / d:.2f}** ({verdict}: {cap}) |")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.table() + ("\n\n" + "\n".join(f"* {n}" for n in self.notes) if self.notes else "")

    def __str__(self) -> str:
        u, d = self.unit
        width = max(len(w) for w, _ in self.rows)
        out = [f"{w:<{width}}  {b / d:7.2f} {u}" for w, b in self.rows]
        out.append(f"{'peak allocated (predicted)':<{width}}  {self.allocated / d:7.2f} {u}")
        cap = f" of {self.capacity / GiB:.1f} GiB" if self.capacity else ""
        label = "needed incl. slack + CUDA context" if self.context else "needed"
        out.append(f"{label:<{width}}  {self.needed / d:7.2f} {u}{cap}: {'fits' if self.fits else 'DOES NOT FIT'}")
        return "\n".join(out + [f"note: {n}" for n in self.notes])

    def bar_chart(self, ax=None, title: str | None = None):
        """A stacked horizontal bar of the breakdown, with the GPU's capacity as a red line."""
        import matplotlib.pyplot as plt

        u, d = self.unit
        ax = ax or plt.subplots(figsize=(8, 1.9))[1]
        left = 0.0
        colors = plt.get_cmap("tab10").colors
        extra = [("slack + CUDA context", self.needed - self.allocated)] if self.context else []
        for i, (what, b) in enumerate(self.rows + extra):
            ax.barh([0], [b / d], left=left, color=colors[i % 10], label=f"{what} ({b / d:.2f})",
                    hatch="//" if i == len(self.rows) else None, alpha=0.5 if i == len(self.rows) else 1.0)
            left += b / d
        if self.capacity:
            ax.axvline(self.capacity / d, color="red", lw=2)
            ax.text(self.capacity / d, 0.45, f" GPU {self.capacity / GiB:.0f} GiB", color="red", va="bottom")
        ax.set_yticks([])
        ax.set_xlabel(u)
        ax.set_xlim(0, max(left, (self.capacity or 0) / d) * 1.05 or 1)
        ax.set_title(title or f"predicted peak memory: {self.needed / d:.2f} {u} "
                              f"({'fits' if self.fits else 'does not fit'})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, fontsize=8, frameon=False)
        return ax


def kind_of(cfg: TrainConfig) -> str:
    """Which calibrated configuration a TrainConfig trains like."""
    if cfg.method == "lora":
        return "lora_te" if cfg.lora_text_encoder else "lora"
    if cfg.method == "textual_inversion":
        return "ti"
    return "unet_te" if cfg.train_text_encoder else "unet"


def resolve_precision(cfg: TrainConfig, device: str, bf16: bool) -> str:
    """The mixed precision a run will use: runtime.resolve_precision's rule (the training loop's), silently."""
    rt = runtime.Runtime("local", device, None, int(device == "cuda"), 0.0, bf16)
    return runtime.resolve_precision(cfg.mixed_precision, rt, warn=False)


def plan(cfg: TrainConfig, model=None, *, gpu_gb: float | None = None, device: str = "cuda", bf16: bool = False,
         num_processes: int = 1, gradient_as_bucket_view: bool = True) -> Plan:
    """Predict the peak GPU memory of training `cfg` on `model` (default: cfg.model) on a GPU of gpu_gb GiB.

    device/bf16 say what the GPU can do (for mixed_precision='auto'); gpu_gb None: no capacity check.
    num_processes > 1: one process of a DDP run (gradient_as_bucket_view as the training loop sets it: True).
    """
    arch = arch_of(model if model is not None else cfg.model)
    precision = resolve_precision(cfg, device, bf16)
    half = precision in ("fp16", "bf16")
    kind = kind_of(cfg)
    ib, why_not = in_backward_active(cfg, num_processes)
    ds = bool(cfg.deepspeed_config)
    eight_bit = cfg.use_8bit_adam and device == "cuda" and not ds
    notes = [f"optimizer in backward falls back to the normal optimizer: {why_not}."] if why_not else []
    trained, full = _trained(arch, cfg, kind)
    rows = _weight_rows(arch, cfg, trained, full, precision if half else "fp32", ds)
    rows.append(_optimizer_row(arch, trained, full, kind, ds, eight_bit))
    if cfg.use_ema:  # nbkit.training.ema: one more fp32 copy of what trains
        rows.append(("EMA of the trained weights (fp32, use_ema)", 4 * sum(trained.values())))
    rows.append(_gradient_row(arch, cfg, trained, ib, ds))
    n_samples = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    run = actmodel.Run(kind, n_samples, cfg.resolution // arch.vae_factor, cfg.gradient_checkpointing, ib, half,
                       cfg.gradient_accumulation_steps > 1, ds, cfg.cache_latents, device == "cuda")
    act, volume, step, act_notes = _activations(arch, run)
    notes += act_notes
    ckpt = "checkpointed" if cfg.gradient_checkpointing else "not checkpointed"
    rows.append((f"activations & temporaries ({ckpt}, {n_samples} x {cfg.resolution} px)", act))
    if num_processes > 1 and not ds:
        rows.append(_ddp_row(step, rows[-2][1], gradient_as_bucket_view, num_processes, notes))
    if device == "cuda":
        rows.append(("cuDNN / cuBLAS workspaces (estimate)", CUDA_WORKSPACE))
    allocated = sum(b for _, b in rows)
    slack = int(allocated * ALLOCATOR_ROUNDING + ALLOCATOR_FRAGMENTATION * volume) if device == "cuda" else 0
    capacity = int(gpu_gb * GiB) if gpu_gb else None
    settings = dict(method=cfg.method, train_text_encoder=cfg.train_text_encoder, precision=precision,
                    use_8bit_adam=eight_bit, gradient_checkpointing=cfg.gradient_checkpointing,
                    optimizer_in_backward=ib, deepspeed=ds, train_batch_size=cfg.train_batch_size,
                    prior=cfg.with_prior_preservation,
                    resolution=cfg.resolution, cache_latents=cfg.cache_latents, model=arch.name,
                    num_processes=num_processes)
    return Plan(rows, allocated, capacity, settings, notes, slack, CUDA_CONTEXT if device == "cuda" else 0)


def _trained(arch: Arch, cfg: TrainConfig, kind: str) -> tuple[dict, dict]:
    """(part -> trained parameters, part -> whether all of it trains)."""
    if kind in ("unet", "unet_te"):
        trained = {"unet": arch.unet, "text_encoder": arch.text_encoder if kind == "unet_te" else 0}
    elif kind in ("lora", "lora_te"):
        trained = {"unet": arch.lora_per_rank_unet * cfg.lora_rank,
                   "text_encoder": arch.lora_per_rank_te * cfg.lora_rank if cfg.lora_text_encoder else 0}
    else:
        trained = {"unet": 0, "text_encoder": arch.token_embedding}
    return trained, {"unet": kind in ("unet", "unet_te"), "text_encoder": kind in ("unet_te", "ti")}


def _weight_rows(arch: Arch, cfg: TrainConfig, trained: dict, full: dict, precision: str,
                 ds: bool) -> list[tuple[str, int]]:
    hb = 2 if precision != "fp32" else 4  # bytes of a frozen weight
    rows = []
    for part, label in (("unet", "UNet"), ("text_encoder", "text encoder")):
        n = getattr(arch, part)
        if full[part]:
            rows.append((f"{label} weights ({'fp16, DeepSpeed' if ds else 'fp32, trained'})", n * (2 if ds else 4)))
        else:
            lora = " + fp32 LoRA)" if trained[part] else ")"
            rows.append((f"{label} weights ({precision}, frozen" + lora, n * hb + trained[part] * 4))
    if not cfg.cache_latents:
        rows.append((f"VAE weights ({precision}; latents not cached)", arch.vae * hb))
    return rows


def _optimizer_row(arch: Arch, trained: dict, full: dict, kind: str, ds: bool, eight_bit: bool) -> tuple[str, int]:
    n_trained = sum(trained.values())
    if ds:
        return "optimizer state (offloaded to CPU by DeepSpeed)", 0
    if eight_bit:
        small = sum(min(arch.small[p], trained[p]) for p in trained if full[p] or kind.startswith("lora"))
        small = min(small, n_trained) if kind != "ti" else 0
        # one formula (optim.adam_state_bytes): the blockwise part as one tensor, the small ones stay fp32
        return "optimizer state (8-bit AdamW)", adam_state_bytes([n_trained - small], True) + adam_state_bytes([small])
    return "optimizer state (AdamW, fp32)", adam_state_bytes([n_trained])


def _gradient_row(arch: Arch, cfg: TrainConfig, trained: dict, ib: bool, ds: bool) -> tuple[str, int]:
    n_trained = sum(trained.values())
    if ib:
        grads = 4 * max(arch.largest[p] for p in trained if trained[p]) if n_trained else 0
        return "gradients (optimizer in backward: one parameter at a time)", grads
    if ds:
        return "gradients (fp16 buckets, DeepSpeed)", min(n_trained * 2,
                                                           4 * actmodel.deepspeed_bucket(cfg.deepspeed_config))
    return "gradients (fp32)", n_trained * 4


def _ddp_row(step, grads: int, bucket_view: bool, procs: int, notes: list) -> tuple[str, int]:
    """DDP's buckets (actmodel.ddp_buckets), with a note saying what they cost."""
    b = actmodel.ddp_buckets(step, grads, bucket_view)
    if bucket_view:
        what = "DDP buckets (= the gradients, held through the forward pass too)"
        notes.append(f"DDP over {procs} processes, gradient_as_bucket_view=True: the gradients are views of DDP's "
                     "buckets (no second copy; bucket_cap_mb only groups them), but the buckets are allocated once "
                     "and zero_grad frees nothing, so the forward pass and the start of backward run with every "
                     f"gradient held: +{b / GiB:.2f} GiB. NCCL's buffers are outside torch's allocator, not counted.")
    else:
        what = "DDP buckets (a second copy of the gradients)"
        notes.append(f"DDP over {procs} processes, gradient_as_bucket_view=False: its buckets are a second copy of "
                     f"every gradient, held for the whole run: +{b / GiB:.2f} GiB.")
    return what, b


def _activations(arch: Arch, run) -> tuple[int, int, object, list[str]]:
    """actmodel.activations for `arch` (an uncalibrated one: SD 1.5's calibration, scaled; rough)."""
    cal, scale, notes = arch.calibration, 1.0, []
    if not cal:
        sd = _arch_of_spec(str(_sd15_spec()))
        cal = sd.calibration
        if not cal:
            raise RuntimeError(f"No activation calibration in {CALIBRATION_FILE}: run "
                               "`python -m nbkit calibrate --spec sd15` to make it.")
        scale = (arch.unet / sd.unet) ** 0.5  # crude: activations grow about with the square root of width^2
        notes.append(f"no activation calibration for {arch.name}: scaled from SD 1.5's (rough). "
                     "Run `python -m nbkit calibrate --spec <folder>` to measure it.")
    act, volume, more, step = actmodel.activations(cal, run, scale)
    return act, volume, step, notes + more


# ------------------------------------------------------------------------------------------------- what to do
def apply_change(cfg: TrainConfig, change: Change) -> TrainConfig:
    s = dict(change.settings)
    if s.get("deepspeed_config") == "8gb-deepspeed preset":
        from nbkit.training.presets import deepspeed_config_path

        s["deepspeed_config"] = str(deepspeed_config_path())
        s.update(use_8bit_adam=False, optimizer_in_backward=False)
    return dataclasses.replace(cfg, **s)


def advise(cfg: TrainConfig, model=None, **plan_kw) -> list[tuple[Change, Plan]]:
    """Each remedy on its own, with the plan it gives (what to change when a plan does not fit)."""
    return [(c, plan(apply_change(cfg, c), model, **plan_kw)) for c in remedies(cfg)]


# ------------------------------------------------------------------------------------------------------- CLI
def _main(argv=None) -> None:
    """`python -m nbkit calibrate ...` (nbkit.memory.memtrace.main)."""
    from nbkit.memory.memtrace import main

    main(argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _main()
