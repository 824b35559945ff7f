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

Beyond a step, `Plan.phases` holds the two other peaks of a run (`nbkit.memory.phases`): caching the latents and
sampling validation pictures; `Plan.peak` is the largest. SDXL (`nbkit.memory.sdxlarch`, `nbkit.memory.archs`) adds
its second text encoder, its fp32 VAE and its own calibration (1024 px); what the plan assumes is in its notes.

On a GPU, `torch.cuda.max_memory_allocated` should match the prediction (`Plan.peak` over a whole run);
`memory_reserved` adds the caching allocator's slack, and the CUDA context (~0.4 GiB, outside PyTorch) comes on
top: `fits` accounts for both.
The benchmark (`benchmarks/bench_memory.py`) checks the prediction against measured peaks on a real GPU.

Recalibrate after changing the training loop: `python -m nbkit calibrate --spec sd15` (minutes) and
`--spec offline --real` (a few minutes; `nbkit.memory.memtrace.calibrate`); stored in `data/memory-calibration.json`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from nbkit.config import ConfigError, TrainConfig
from nbkit.env import runtime
from nbkit.memory import actmodel, archs, phases
from nbkit.memory.actmodel import CALIBRATION_FILE
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
# the architecture's side (nbkit.memory.archs), importable from here too
Arch, arch_of, arch_from_parts, SD15_IDS, TEXT_ENCODERS = (archs.Arch, archs.arch_of, archs.arch_from_parts,
                                                           archs.SD15_IDS, archs.TEXT_ENCODERS)


# ------------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """A predicted peak, its parts, and whether it fits the GPU."""

    rows: list[tuple[str, int]]  # (what, bytes) summing to `allocated`
    allocated: int  # predicted torch.cuda.max_memory_allocated() of a training step
    capacity: int | None  # the GPU's memory (bytes); None on a CPU
    settings: dict  # the settings the plan was made for
    notes: list[str] = field(default_factory=list)
    slack: int = 0  # the caching allocator's: reserved - allocated
    context: int = 0  # the CUDA context (outside torch)
    phases: list[tuple[str, int]] = field(default_factory=list)  # (what, peak allocated) outside the step

    @property
    def peak(self) -> int:
        """Predicted torch.cuda.max_memory_allocated() over the whole run: the step's, or caching's / sampling's."""
        return max([self.allocated] + [b for _, b in self.phases])

    @property
    def reserved(self) -> int:
        """Predicted torch.cuda.max_memory_reserved(): allocated plus the caching allocator's slack (a phase outside
        the step: its block rounding only)."""
        return max([self.allocated + self.slack] + [int(b * (1 + ALLOCATOR_ROUNDING)) for _, b in self.phases])

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
        lines += [f"| {what}: peak allocated{' (the run’s peak)' if b > self.allocated else ''} | {b / d:.2f} |"
                  for what, b in self.phases]
        if self.context:
            lines.append(f"| + allocator slack and CUDA context | {(self.needed - self.peak) / d:.2f} |")
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
        out += [f"{what}: peak allocated {b / d:.2f} {u}" for what, b in self.phases]
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
        above = " + caching / sampling above the step" if self.peak > self.allocated else ""
        extra = [("slack + CUDA context" + above, self.needed - self.allocated)] if self.context else []
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
    half, cuda = precision in ("fp16", "bf16"), device == "cuda"
    kind = kind_of(cfg)
    if kind == "ti" and arch.sdxl:
        raise ConfigError("textual_inversion on SDXL is not supported by the kit (it needs an embedding per text "
                         "encoder): plan method='lora' (or 'dreambooth') for SDXL, or textual inversion on SD 1.5.")
    ib, why_not = in_backward_active(cfg, num_processes)
    ds = bool(cfg.deepspeed_config)
    eight_bit = cfg.use_8bit_adam and cuda and not ds
    notes = [f"optimizer in backward falls back to the normal optimizer: {why_not}."] if why_not else []
    trained, full = _trained(arch, cfg, kind)
    rows = _weight_rows(arch, cfg, trained, full, precision if half else "fp32", ds)
    weights = sum(b for _, b in rows)
    rows.append(_optimizer_row(arch, trained, full, kind, ds, eight_bit))
    if cfg.use_ema:  # nbkit.training.ema: one more fp32 copy of what trains
        rows.append(("EMA of the trained weights (fp32, use_ema)", 4 * sum(trained.values())))
    held = sum(b for _, b in rows)  # what stays between steps
    rows.append(_gradient_row(arch, cfg, trained, ib, ds))
    grads = rows[-1][1]
    n_samples = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    if arch.sdxl and cuda:
        rows.append(_inputs_row(arch, cfg, kind, n_samples))
    run = actmodel.Run(kind, n_samples, cfg.resolution // arch.vae_factor, cfg.gradient_checkpointing, ib, half,
                       cfg.gradient_accumulation_steps > 1, ds, cfg.cache_latents, cuda)
    act, volume, step, act_notes = _activations(arch, run)
    notes += act_notes
    ckpt = "checkpointed" if cfg.gradient_checkpointing else "not checkpointed"
    rows.append((f"activations & temporaries ({ckpt}, {n_samples} x {cfg.resolution} px)", act))
    if num_processes > 1 and not ds:
        rows.append(_ddp_row(step, grads, gradient_as_bucket_view, num_processes, notes))
    workspace = CUDA_WORKSPACE if cuda else 0
    if cuda:
        rows.append(("cuDNN / cuBLAS workspaces (estimate)", CUDA_WORKSPACE))
    allocated = sum(b for _, b in rows)
    slack = int(allocated * ALLOCATOR_ROUNDING + ALLOCATOR_FRAGMENTATION * volume) if cuda else 0
    cal = arch.calibration or archs._arch_of_spec(str(archs.sd15_spec())).calibration
    found = [phases.caching(arch, cal, cfg, weights, precision, workspace),
             phases.validation(arch, cal, cfg, held, precision, workspace)]
    if arch.sdxl:
        notes += _sdxl_notes(arch, cfg, kind, precision)
    top = max(found)
    if top[0] > allocated:
        notes.append(f"the run's peak is not a training step: {top[1]}, {(top[0] - allocated) / GiB:.2f} GiB above "
                     "the step's.")
    capacity = int(gpu_gb * GiB) if gpu_gb else None
    return Plan(rows, allocated, capacity, _settings(cfg, arch, precision, eight_bit, ib, ds, num_processes), notes,
                slack, CUDA_CONTEXT if cuda else 0, [(what, b) for b, what in found if b])


def _settings(cfg: TrainConfig, arch: Arch, precision: str, eight_bit: bool, ib: bool, ds: bool, procs: int) -> dict:
    return dict(method=cfg.method, train_text_encoder=cfg.train_text_encoder, precision=precision,
                use_8bit_adam=eight_bit, gradient_checkpointing=cfg.gradient_checkpointing,
                optimizer_in_backward=ib, deepspeed=ds, train_batch_size=cfg.train_batch_size,
                prior=cfg.with_prior_preservation, resolution=cfg.resolution, cache_latents=cfg.cache_latents,
                model=arch.name, architecture=arch.architecture, lora_rank=cfg.lora_rank, num_processes=procs)


TE_LABELS = {"text_encoder": "text encoder", "text_encoder_2": "text encoder 2 (OpenCLIP bigG)"}


def _text_encoders(arch: Arch) -> tuple[str, ...]:
    return TEXT_ENCODERS if arch.text_encoder_2 else ("text_encoder",)


def _trained(arch: Arch, cfg: TrainConfig, kind: str) -> tuple[dict, dict]:
    """(part -> trained parameters, part -> whether all of it trains); SDXL's text encoders train together."""
    tes = _text_encoders(arch)
    if kind in ("unet", "unet_te"):
        trained = {"unet": arch.unet, **{t: arch.params(t) if kind == "unet_te" else 0 for t in tes}}
    elif kind in ("lora", "lora_te"):
        trained = {"unet": arch.lora_per_rank_unet * cfg.lora_rank,
                   **{t: arch.lora_per_rank(t) * cfg.lora_rank if cfg.lora_text_encoder else 0 for t in tes}}
    else:
        trained = {"unet": 0, "text_encoder": arch.token_embedding}
    full = {"unet": kind in ("unet", "unet_te"),
            **{t: kind == "unet_te" or (kind == "ti" and t == "text_encoder") for t in tes}}
    return trained, full


def _weight_rows(arch: Arch, cfg: TrainConfig, trained: dict, full: dict, precision: str,
                 ds: bool) -> list[tuple[str, int]]:
    hb = 2 if precision != "fp32" else 4  # bytes of a frozen weight
    rows = []
    for part in ("unet", *_text_encoders(arch)):
        n, label = arch.params(part), TE_LABELS.get(part, "UNet")
        if full[part]:
            rows.append((f"{label} weights ({'fp16, DeepSpeed' if ds else 'fp32, trained'})", n * (2 if ds else 4)))
        else:
            lora = " + fp32 LoRA)" if trained[part] else ")"
            rows.append((f"{label} weights ({precision}, frozen" + lora, n * hb + trained[part] * 4))
    if not cfg.cache_latents:
        vb = phases.vae_bytes_per_element(arch, cfg, precision)
        rows.append((f"VAE weights ({'fp32' if vb == 4 else precision}; latents not cached)", arch.vae * vb))
    return rows


def _inputs_row(arch: Arch, cfg: TrainConfig, kind: str, n: int) -> tuple[str, int]:
    """A step's inputs on the GPU: the cached latents and prompt embeddings live on the CPU, moved per step (fp32)."""
    lat = 4 * 4 * (cfg.resolution // arch.vae_factor) ** 2 if cfg.cache_latents else 3 * 4 * cfg.resolution ** 2
    emb = 4 * (77 * arch.cross_attention_dim + arch.pooled_dim + 6) if kind in ("unet", "lora") else 8 * 77 * 2
    what = "latents" if cfg.cache_latents else "pictures"
    return f"this step's cached {what} + prompt embeddings ({n} x, from the CPU)", n * (lat + emb)


def _sdxl_notes(arch: Arch, cfg: TrainConfig, kind: str, precision: str) -> list[str]:
    tes = sum(arch.params(t) for t in TEXT_ENCODERS) * (2 if precision != "fp32" else 4)
    notes = []
    if kind in ("unet", "lora"):
        notes.append(f"SDXL: both text encoders stay on the GPU ({tes / GiB:.2f} GiB) although the prompt embeddings "
                     "are cached once (the training loop keeps them for the validation samples); moving them off "
                     f"the GPU after caching would save {tes / GiB:.2f} GiB.")
    vb = phases.vae_bytes_per_element(arch, cfg, precision)
    notes.append(f"SDXL's VAE in {'fp32 (its config says force_upcast: it overflows in fp16)' if vb == 4 else 'fp16'}"
                 f" ({arch.vae * vb / GiB:.2f} GiB) " + ("is on the GPU only while the latents are cached and the "
                                                         "validation pictures decoded." if cfg.cache_latents else
                                                         "stays on the GPU (latents not cached)."))
    if cfg.with_prior_preservation:
        notes.append("SDXL: generating the class pictures (before training, at the run's resolution) is not planned.")
    return notes


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
        sd = archs._arch_of_spec(str(archs.sd15_spec()))
        cal = sd.calibration
        if not cal:
            raise RuntimeError(f"No activation calibration in {CALIBRATION_FILE}: run "
                               "`python -m nbkit calibrate --spec sd15` to make it.")
        scale = (arch.unet / sd.unet) ** 0.5  # crude: activations grow about with the square root of width^2
        notes.append(f"no activation calibration for {arch.name}: scaled from SD 1.5's (rough). "
                     "Run `python -m nbkit calibrate --spec <folder>` to measure it.")
    if run.kind.endswith("_te") and run.kind not in {k.split("|")[0] for k in cal.get("configs", {})}:
        notes.append(f"{arch.name}'s calibration has the UNet's activations only (SDXL's: text encoders frozen): the "
                     "trained text encoders' own (77 tokens) are left out; small next to the UNet's at 1024 px.")
        run = dataclasses.replace(run, kind=run.kind.removesuffix("_te"))
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
