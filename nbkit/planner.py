"""Predict the peak GPU memory of a training run before it starts, show the breakdown, and say what to change.

The peak of a step is: the weights on the GPU (each part in its precision) + the optimizer state (AdamW: two
fp32 numbers per trained parameter; bitsandbytes 8-bit AdamW: two bytes, and fp32 for tensors under 4,096
elements) + the most that the step itself holds at once: gradients (fp32, one per trained parameter; only one
parameter's at a time with the optimizer in backward) and activations (what the forward pass keeps for the
backward pass; with gradient checkpointing only each block's input, the rest recomputed), plus autocast's
half-precision copies of fp32 weights. Weights and optimizer state come from parameter counts; the step's
part comes from an activation model calibrated on `nbkit.memtrace`, which counts every tensor a step of the
same architecture allocates (SD 1.5 at 512 px simulated on a CPU with fake tensors). Per sample, activations
grow linearly with the latent's pixels (attention runs through SDPA's flash / memory-efficient kernels, which
keep no attention matrix), so the model is `fixed + samples x per_sample x (pixels / reference pixels)`.

On a GPU, `torch.cuda.max_memory_allocated` should match the prediction; `memory_reserved` adds the caching
allocator's slack, and the CUDA context (~0.4 GiB, outside PyTorch) comes on top: `fits` accounts for both.
The benchmark (`benchmarks/bench_memory.py`) checks the prediction against measured peaks on a real GPU.

Recalibrate after changing the training loop: `python -m nbkit calibrate --spec sd15` (minutes) and
`--spec offline --real` (a few minutes); the figures are stored in `data/memory-calibration.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig
from .optim import in_backward_active

GiB = 2**30
MiB = 2**20
CALIBRATION_FILE = Path(__file__).resolve().parent.parent / "data" / "memory-calibration.json"
REFERENCE = {"sd15": 64, "offline": 16}  # latent side each shipped calibration was measured at (offline: 64 px / 4)
# Terms the CPU simulation cannot see, from the published anchors (diffusers PR #2039: 11,124 MiB; the T4 table
# of the DreamBooth 16 GB recipe: 9.92 GB, ...) until benchmarks/RESULTS.md has measured them:
CUDA_CONTEXT = int(0.45 * GiB)  # the CUDA context and kernels: outside torch's allocator, inside the GPU's memory
CUDA_WORKSPACE = int(0.5 * GiB)  # cuDNN / cuBLAS workspaces (allocated through torch's allocator)
ALLOCATOR_ROUNDING = 0.03  # reserved / allocated - 1 from block rounding
# plus, in reserved: freed activation blocks that gradients and later steps cannot reuse, as a multiple of one
# step's activation volume (2.0 fits the published T4 table within 3%: 9.92 / 10.4 / 11.17 / 13.67 GB)
ALLOCATOR_FRAGMENTATION = 2.0
BNB_MIN_8BIT = 4096  # bitsandbytes keeps fp32 state for tensors smaller than this
SD15_IDS = ("stable-diffusion-v1-5", "stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5", "CompVis/stable-diffusion")


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


def _fingerprint(unet_cfg: dict, te_cfg: dict) -> str:
    """Architecture identity for the activation calibration (weights, vocabulary size and names excluded)."""
    keep_te = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act")
    u = {k: v for k, v in sorted(unet_cfg.items()) if not k.startswith("_")}
    t = {k: te_cfg.get(k) for k in keep_te}
    return hashlib.sha256(json.dumps([u, t], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lora_per_rank(module, targets: list[str]) -> int:
    import torch

    n = 0
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += m.in_features + m.out_features
    return n


def arch_from_parts(parts, name: str | None = None) -> Arch:
    """The Arch of loaded (or meta-built) parts."""
    from .methods import LORA_TARGETS_TEXT, LORA_TARGETS_UNET

    def count(m):
        return sum(p.numel() for p in m.parameters()) if m is not None else 0

    def largest(m):
        return max((p.numel() for p in m.parameters()), default=0)

    def small(m):
        return sum(p.numel() for p in m.parameters() if p.numel() < BNB_MIN_8BIT)

    unet_cfg = dict(parts.unet.config)
    te_cfg = parts.text_encoder.config.to_dict()
    fp = _fingerprint(unet_cfg, te_cfg)
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
    from .sd15 import build_parts

    name = "sd15" if Path(spec).resolve() == _sd15_spec().resolve() else None
    return arch_from_parts(build_parts("meta", spec=spec), name)


def _sd15_spec() -> Path:
    from .sd15 import SPEC

    return SPEC


def arch_of(model) -> Arch:
    """The Arch of `model`: loaded SDParts, "offline", "sd15", SD 1.x hub ids, or a local diffusers folder.

    Parameters are counted on the meta device from the configs: nothing is downloaded or allocated.
    """
    from .models import SDParts, resolve

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
    data = _load_calibrations()
    return data.get(fp, {}).get("name", f"model-{fp[:6]}")


# ------------------------------------------------------------------------------------------------ calibration
def _load_calibrations() -> dict:
    data = {}
    for f in (CALIBRATION_FILE, _cache_file()):
        if f.exists():
            data.update(json.loads(f.read_text()))
    return data


def _cache_file() -> Path:
    from .offline import cache_dir

    return cache_dir() / "memory-calibration.json"


def calibration_for(fingerprint: str, unet_params: int | None = None) -> tuple[dict, str]:
    """(calibration, where it came from) for an architecture; ({}, 'none') when it was never calibrated.

    A model whose configs differ only in details (a hub config listing keys the spec leaves to defaults) is
    matched by its UNet's exact parameter count."""
    data = _load_calibrations()
    if fingerprint in data:
        return data[fingerprint], "calibrated (nbkit.memtrace)"
    for entry in data.values():
        if unet_params and entry.get("unet_params") == unet_params:
            return entry, f"calibrated for {entry['name']} (same UNet parameter count)"
    return {}, "none"


def config_key(kind: str, checkpointing: bool, in_backward: bool, half: bool) -> str:
    return f"{kind}|ckpt={int(checkpointing)}|ib={int(in_backward)}|{'half' if half else 'fp32'}"


def calibrate(spec, *, name: str, latent: int, fake: bool = True, half_only: bool = False, kinds=None,
              progress=print) -> dict:
    """Measure the activation model of the architecture in `spec` with nbkit.memtrace (see the module doc)."""
    from . import memtrace
    from .sd15 import build_parts

    parts = build_parts("meta", spec=spec)
    fp = _fingerprint(dict(parts.unet.config), parts.text_encoder.config.to_dict())
    out = {"name": name, "reference_latent": latent, "configs": {},
           "unet_params": sum(p.numel() for p in parts.unet.parameters())}
    combos = [(k, ck, False) for k in memtrace.KINDS for ck in (False, True)]
    combos += [(k, ck, True) for k in ("unet", "unet_te") for ck in (False, True)]
    if kinds:
        combos = [c for c in combos if f"{c[0]}|ib={int(c[2])}" in kinds or c[0] in kinds]
    for half in ((True,) if half_only else (True, False)):
        for kind, ck, ib in combos:
            one = memtrace.simulate_step(spec, kind, batch=1, latent=latent, checkpointing=ck, half=half,
                                         in_backward=ib, fake=fake)
            two = memtrace.simulate_step(spec, kind, batch=2, latent=latent, checkpointing=ck, half=half,
                                         in_backward=ib, fake=fake)
            row = {"F0": 2 * one.forward_peak - two.forward_peak, "Fs": two.forward_peak - one.forward_peak,
                   "B0": 2 * one.backward_peak - two.backward_peak, "Bs": two.backward_peak - one.backward_peak,
                   "G": one.after}
            out["configs"][config_key(kind, ck, ib, half)] = row
            progress(f"{config_key(kind, ck, ib, half)}: {json.dumps(row)}")
    if kinds and "vae" not in kinds:
        return {fp: out}
    out["vae_encode_per_image"] = memtrace.simulate_vae_encode(spec, batch=1, size=latent * _vae_factor(parts),
                                                              half=True, fake=fake)
    return {fp: out}


def _vae_factor(parts) -> int:
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


def save_calibration(entry: dict, path: Path = CALIBRATION_FILE) -> None:
    """Merge an architecture's calibration into `path` (configurations measured before are kept)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    for fp, e in entry.items():
        old = data.get(fp, {})
        if old.get("reference_latent", e["reference_latent"]) != e["reference_latent"]:
            old = {}
        merged = {**old, **{k: v for k, v in e.items() if k != "configs"}}
        merged["configs"] = {**old.get("configs", {}), **e["configs"]}
        data[fp] = merged
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


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
    """The mixed precision a run will use (the same rule as the training loop)."""
    p = cfg.mixed_precision
    if p == "auto":
        p = "no" if device != "cuda" else ("bf16" if bf16 else "fp16")
    if p == "bf16" and device == "cuda" and not bf16:
        p = "fp16"
    if p == "fp16" and device != "cuda":
        p = "no"
    return p


def plan(cfg: TrainConfig, model=None, *, gpu_gb: float | None = None, device: str = "cuda", bf16: bool = False,
         num_processes: int = 1) -> Plan:
    """Predict the peak GPU memory of training `cfg` on `model` (default: cfg.model) on a GPU of gpu_gb GiB.

    device/bf16 say what the GPU can do (for mixed_precision='auto'); gpu_gb None: no capacity check.
    """
    arch = arch_of(model if model is not None else cfg.model)
    precision = resolve_precision(cfg, device, bf16)
    half = precision in ("fp16", "bf16")
    hb = 2 if half else 4  # bytes of a frozen weight / activation element
    kind = kind_of(cfg)
    ib, why_not = in_backward_active(cfg, num_processes)
    ds = bool(cfg.deepspeed_config)
    eight_bit = cfg.use_8bit_adam and device == "cuda" and not ds
    notes: list[str] = []
    if why_not:
        notes.append(f"optimizer in backward falls back to the normal optimizer: {why_not}.")

    # --- weights on the GPU
    rows: list[tuple[str, int]] = []
    lora_rank_params = {"unet": arch.lora_per_rank_unet * cfg.lora_rank,
                        "text_encoder": arch.lora_per_rank_te * cfg.lora_rank if cfg.lora_text_encoder else 0}
    if kind in ("unet", "unet_te"):
        trained = {"unet": arch.unet, "text_encoder": arch.text_encoder if kind == "unet_te" else 0}
    elif kind in ("lora", "lora_te"):
        trained = lora_rank_params
    else:
        trained = {"unet": 0, "text_encoder": arch.token_embedding}
    full = {"unet": kind in ("unet", "unet_te"), "text_encoder": kind in ("unet_te", "ti")}
    for part, label in (("unet", "UNet"), ("text_encoder", "text encoder")):
        n = getattr(arch, part)
        if full[part]:
            b = n * (2 if ds else 4)
            what = f"{label} weights ({'fp16, DeepSpeed' if ds else 'fp32, trained'})"
        else:
            b = n * hb + trained[part] * 4
            what = f"{label} weights ({precision if half else 'fp32'}, frozen" + (" + fp32 LoRA)" if trained[part] else ")")
        rows.append((what, b))
    if not cfg.cache_latents:
        rows.append((f"VAE weights ({precision if half else 'fp32'}; latents not cached)", arch.vae * hb))

    # --- optimizer state
    n_trained = sum(trained.values())
    if ds:
        opt = 0
        opt_what = "optimizer state (offloaded to CPU by DeepSpeed)"
    elif eight_bit:
        small = sum(min(arch.small[p], trained[p]) for p in trained if full[p] or kind.startswith("lora"))
        small = min(small, n_trained) if kind != "ti" else 0
        opt = int((n_trained - small) * (2 + 8 / 256) + small * 8)
        opt_what = "optimizer state (8-bit AdamW)"
    else:
        opt = n_trained * 8
        opt_what = "optimizer state (AdamW, fp32)"
    rows.append((opt_what, opt))

    # --- gradients and activations: the step
    if ib:
        grads = 4 * max(arch.largest[p] for p in trained if trained[p]) if n_trained else 0
        grad_what = "gradients (optimizer in backward: one parameter at a time)"
    elif ds:
        bucket = _deepspeed_bucket(cfg.deepspeed_config)
        grads = min(n_trained * 2, 2 * bucket * 2)
        grad_what = "gradients (fp16 buckets, DeepSpeed)"
    else:
        grads = n_trained * 4
        grad_what = "gradients (fp32)"
    act, volume, act_notes = _activations(arch, kind, cfg, half, ib, ds)
    notes += act_notes
    rows.append((grad_what, grads))
    ckpt = "checkpointed" if cfg.gradient_checkpointing else "not checkpointed"
    n_samples = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    rows.append((f"activations & temporaries ({ckpt}, {n_samples} x {cfg.resolution} px)", act))
    if device == "cuda":
        rows.append(("cuDNN / cuBLAS workspaces (estimate)", CUDA_WORKSPACE))
    allocated = sum(b for _, b in rows)
    slack = int(allocated * ALLOCATOR_ROUNDING + ALLOCATOR_FRAGMENTATION * volume) if device == "cuda" else 0
    capacity = int(gpu_gb * GiB) if gpu_gb else None
    settings = dict(method=cfg.method, train_text_encoder=cfg.train_text_encoder, precision=precision,
                    use_8bit_adam=eight_bit, gradient_checkpointing=cfg.gradient_checkpointing, optimizer_in_backward=ib,
                    deepspeed=ds, train_batch_size=cfg.train_batch_size, prior=cfg.with_prior_preservation,
                    resolution=cfg.resolution, cache_latents=cfg.cache_latents, model=arch.name)
    return Plan(rows, allocated, capacity, settings, notes, slack, CUDA_CONTEXT if device == "cuda" else 0)


def _deepspeed_bucket(path: str) -> int:
    try:
        z = json.loads(Path(path).read_text()).get("zero_optimization", {})
        return int(float(z.get("reduce_bucket_size", 5e8)))
    except (OSError, ValueError):
        return int(5e8)


def _activations(arch: Arch, kind: str, cfg: TrainConfig, half: bool, ib: bool,
                 ds: bool) -> tuple[int, int, list[str]]:
    """(peak bytes the step holds beyond weights, optimizer state and the gradients row; the step's activation
    volume, which the caching allocator mostly cannot reuse for gradients; notes)."""
    notes = []
    cal = arch.calibration
    latent = cfg.resolution // arch.vae_factor
    n = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    ckpt = cfg.gradient_checkpointing
    scale = 1.0
    if not cal:
        sd = _arch_of_spec(str(_sd15_spec()))
        cal = sd.calibration
        if not cal:
            raise RuntimeError(f"No activation calibration in {CALIBRATION_FILE}: run "
                               "`python -m nbkit calibrate --spec sd15` to make it.")
        scale = (arch.unet / sd.unet) ** 0.5  # crude: activations grow about with the square root of width^2
        notes.append(f"no activation calibration for {arch.name}: scaled from SD 1.5's (rough). "
                     "Run `python -m nbkit calibrate --spec <folder>` to measure it.")
    key = config_key(kind, ckpt, ib, half)
    fp32_from_half = False
    if key not in cal.get("configs", {}):
        key = config_key(kind, ckpt, ib, True)
        fp32_from_half = not half
    if key not in cal.get("configs", {}):
        key = config_key(kind, ckpt, False, True)
        notes.append("optimizer-in-backward activations not calibrated for this method: assumed as without.")
    row = cal["configs"][key]
    ref_px = cal["reference_latent"] ** 2
    ratio = (latent * latent) / ref_px
    forward = row["F0"] + n * row["Fs"] * ratio
    backward = row["B0"] + n * row["Bs"] * ratio
    if cfg.gradient_accumulation_steps > 1 and not ib:
        forward += row["G"]  # the next micro-step runs forward while the summed gradients are held
    step = max(forward, backward) - row["G"]
    if ds:  # DeepSpeed keeps the model in fp16: no autocast copies, gradients in its own buckets
        step = n * max(row["Fs"], row["Bs"]) * ratio
        notes.append("DeepSpeed activations estimated from the per-sample part of the calibration (not measured).")
    if fp32_from_half:
        step *= 2
        notes.append("fp32 activations estimated as twice the calibrated half-precision ones.")
    if not cfg.cache_latents:
        step = max(step, cal.get("vae_encode_per_image", 0) * n * ratio)
    volume = n * row["Fs"] * ratio * (2 if fp32_from_half else 1)
    return int(max(step, 0) * scale), int(volume * scale), notes


# ------------------------------------------------------------------------------------------------- what to do
@dataclass
class Change:
    settings: dict  # TrainConfig fields to set
    why: str
    automatic: bool = True  # False: only suggested (it changes what is trained or needs another setup)


def remedies(cfg: TrainConfig) -> list[Change]:
    """Memory savers not yet in `cfg`, cheapest first (in quality and speed)."""
    out = []
    if not cfg.use_8bit_adam and not cfg.deepspeed_config:
        out.append(Change({"use_8bit_adam": True}, "8-bit AdamW: optimizer state 4x smaller, same results"))
    if not cfg.gradient_checkpointing:
        out.append(Change({"gradient_checkpointing": True}, "gradient checkpointing: recompute activations in "
                                                            "backward (~20-30% slower)"))
    if not cfg.cache_latents:
        out.append(Change({"cache_latents": True}, "cache latents: encode the images once, VAE off the GPU"))
    if cfg.train_batch_size > 1 and not cfg.optimizer_in_backward:
        out.append(Change({"train_batch_size": 1, "gradient_accumulation_steps":
                           cfg.gradient_accumulation_steps * cfg.train_batch_size},
                          f"batch {cfg.train_batch_size} -> 1 x {cfg.train_batch_size} accumulation steps "
                          "(same effective batch)"))
    if (cfg.method == "dreambooth" and not cfg.optimizer_in_backward and not cfg.deepspeed_config
            and cfg.gradient_accumulation_steps == 1):
        out.append(Change({"optimizer_in_backward": True, "max_grad_norm": 0.0},
                          "optimizer in backward: no full gradient buffer (no clipping, no accumulation)"))
    if cfg.method == "dreambooth" and not cfg.train_text_encoder:
        out.append(Change({"deepspeed_config": "8gb-deepspeed preset"},
                          "DeepSpeed ZeRO-2 with CPU offload (preset '8gb-deepspeed'; needs ~25 GB of host RAM "
                          "and `pip install deepspeed`)", automatic=False))
    if cfg.method == "dreambooth":
        out.append(Change({"method": "lora"}, "LoRA instead of full DreamBooth (a few MB of trained weights)",
                          automatic=False))
    if cfg.resolution > 384:
        out.append(Change({"resolution": cfg.resolution * 3 // 4 // 8 * 8},
                          "a lower training resolution (activations shrink with the pixels)", automatic=False))
    return out


def apply_change(cfg: TrainConfig, change: Change) -> TrainConfig:
    s = dict(change.settings)
    if s.get("deepspeed_config") == "8gb-deepspeed preset":
        from .presets import deepspeed_config_path

        s["deepspeed_config"] = str(deepspeed_config_path())
        s.update(use_8bit_adam=False, optimizer_in_backward=False)
    return dataclasses.replace(cfg, **s)


def advise(cfg: TrainConfig, model=None, **plan_kw) -> list[tuple[Change, Plan]]:
    """Each remedy on its own, with the plan it gives (what to change when a plan does not fit)."""
    return [(c, plan(apply_change(cfg, c), model, **plan_kw)) for c in remedies(cfg)]


# ------------------------------------------------------------------------------------------------------- CLI
def _main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m nbkit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure an architecture's activation model with nbkit.memtrace")
    c.add_argument("--spec", default="sd15", help="'sd15', 'offline' or a diffusers folder (configs are enough)")
    c.add_argument("--latent", type=int, default=None, help="reference latent side (default 64 for sd15, 32 offline)")
    c.add_argument("--real", action="store_true", help="run real tensors (small models) instead of fake ones")
    c.add_argument("--half-only", action="store_true", help="skip the fp32 configurations")
    c.add_argument("--kinds", default=None, help="comma list: only these (e.g. lora,ti,unet|ib=1,vae)")
    c.add_argument("--out", default=str(CALIBRATION_FILE))
    args = ap.parse_args(argv)
    from .offline import OFFLINE_SPEC

    spec = {"sd15": _sd15_spec(), "offline": OFFLINE_SPEC}.get(args.spec, Path(args.spec))
    name = args.spec if args.spec in REFERENCE else Path(args.spec).name
    latent = args.latent or REFERENCE.get(args.spec, 64)
    entry = calibrate(spec, name=name, latent=latent, fake=not args.real, half_only=args.half_only,
                      kinds=args.kinds.split(",") if args.kinds else None)
    save_calibration(entry, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _main()
