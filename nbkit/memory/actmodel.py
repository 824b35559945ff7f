"""The planner's step model: what a training step holds beyond the weights and the optimizer state.

Calibrations come from `nbkit.memory.memtrace` (a step of each training configuration simulated on a CPU, at batch 1
and 2) and are stored per architecture in `data/memory-calibration.json`. A row holds F0 + n Fs (the forward
peak for n samples at the reference latent size), B0 + n Bs (the backward peak) and G (what is still held
after backward: the gradients). `activations()` scales a row to a run (samples, pixels) and adds what the CPU
simulation cannot see:

* on CUDA, autocast runs group_norm / layer_norm in fp32 (CPU autocast keeps them in 16 bits): the
  activations saved for backward are `CUDA_NORM_FACTOR` times the calibrated ones;
* with several processes, DDP keeps the gradients in its communication buckets, allocated once and held
  through the next forward pass as well: `ddp_buckets()`.

This module imports nothing else from nbkit at import time but nbkit.paths (the planner imports it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from nbkit.paths import ROOT, cache_dir

CALIBRATION_FILE = ROOT / "data" / "memory-calibration.json"  # the shipped file (not NBKIT_DATA's)
REFERENCE = {"sd15": 64, "sdxl": 128, "offline": 16}  # latent side each shipped calibration was measured at
# (SDXL: 1024 px / 8; offline: 64 px / 4)

# Saved activations under CUDA's autocast / under CPU's (per sample, SD 1.5's UNet at 512 px: 1.325 trained,
# 1.327 frozen as for LoRA and TI), measured by `nbkit.memory.memtrace.cuda_norm_factor` on fake tensors, CUDA's op
# policy emulated on the CPU. CPU bf16 autocast runs group_norm / layer_norm in bf16; CUDA autocast has them on
# its fp32 list, so (1) each norm saves an fp32 copy of its input (+2 bytes an element), (2) its fp32 output
# makes the SiLU after a GroupNorm run, and save its input, in fp32 (+2), and (3) each conv / linear after a
# norm saves its own fp16 cast of the output: three after a LayerNorm feeding to_q, to_k and to_v (+4). In the
# CPU trace norm inputs and norm outputs are 17 % of the saved bytes each. Checked in tests/test_planner.py (SD
# 1.5 itself, and a 1/10-width UNet of the same layout with real tensors).
CUDA_NORM_FACTOR = 1.325


def fingerprint(unet_cfg: dict, te_cfg: dict, te2_cfg: dict | None = None) -> str:
    """Architecture identity for the activation calibration (weights, vocabulary size and names excluded); SDXL's
    second text encoder joins it (a model with one text encoder keeps the identity it always had)."""
    keep_te = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act")
    u = {k: v for k, v in sorted(unet_cfg.items()) if not k.startswith("_")}
    ids = [u, {k: te_cfg.get(k) for k in keep_te}]
    if te2_cfg is not None:
        ids.append({k: te2_cfg.get(k) for k in keep_te})
    return hashlib.sha256(json.dumps(ids, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ calibration
def load_calibrations() -> dict:
    data = {}
    for f in (CALIBRATION_FILE, _cache_file()):
        if f.exists():
            data.update(json.loads(f.read_text()))
    return data


def _cache_file() -> Path:
    return cache_dir() / "memory-calibration.json"


def calibration_for(fingerprint: str, unet_params: int | None = None) -> tuple[dict, str]:
    """(calibration, where it came from) for an architecture; ({}, 'none') when it was never calibrated.

    A model whose configs differ only in details (a hub config listing keys the spec leaves to defaults) is
    matched by its UNet's exact parameter count."""
    data = load_calibrations()
    if fingerprint in data:
        return data[fingerprint], "calibrated (nbkit.memory.memtrace)"
    for entry in data.values():
        if unet_params and entry.get("unet_params") == unet_params:
            return entry, f"calibrated for {entry['name']} (same UNet parameter count)"
    return {}, "none"


def config_key(kind: str, checkpointing: bool, in_backward: bool, half: bool) -> str:
    return f"{kind}|ckpt={int(checkpointing)}|ib={int(in_backward)}|{'half' if half else 'fp32'}"


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


# ------------------------------------------------------------------------------------------------------- step
@dataclass(frozen=True)
class Step:
    """One step's calibrated peaks (bytes), scaled to a run; `single` is the planner's activations row."""

    forward: float  # forward peak: activations, autocast copies, temporaries (no gradients held)
    backward: float  # backward peak beyond the gradients held after it (activations still alive, temporaries)
    held: float  # backward peak beyond the gradients when all of them exist from the start (DDP's buckets)
    scale: float  # applied to the estimate (x2: fp32 from a half-precision calibration; uncalibrated models)
    floor: float  # the VAE encoding the pictures (latents not cached): held next to the gradients
    single: float  # what one process holds beyond its gradients row at the peak


@dataclass(frozen=True)
class Run:
    """What the step model needs to know about a run."""

    kind: str  # memtrace.KINDS
    samples: int  # in one UNet call (prior preservation: twice the batch)
    latent: int  # latent side
    checkpointing: bool
    in_backward: bool
    half: bool  # 16-bit mixed precision
    accumulating: bool  # gradient_accumulation_steps > 1
    deepspeed: bool
    cache_latents: bool
    cuda: bool  # on a CUDA GPU (autocast's fp32 norms)


def activations(cal: dict, run: Run, scale: float = 1.0) -> tuple[int, int, list[str], Step]:
    """For calibration `cal` (times `scale` when it is another architecture's): (the activations row: the peak
    bytes the step holds beyond weights, optimizer state and gradients; the step's activation volume, which the
    caching allocator mostly cannot reuse; notes; the Step, for the DDP row)."""
    notes = []
    key = config_key(run.kind, run.checkpointing, run.in_backward, run.half)
    fp32_from_half = False
    if key not in cal.get("configs", {}):
        key = config_key(run.kind, run.checkpointing, run.in_backward, True)
        fp32_from_half = not run.half
    if key not in cal.get("configs", {}):
        key = config_key(run.kind, run.checkpointing, False, True)
        notes.append("optimizer-in-backward activations not calibrated for this method: assumed as without.")
    row = cal["configs"][key]
    per = run.samples * run.latent ** 2 / cal["reference_latent"] ** 2  # samples x pixels / reference pixels
    k = norm_factor(run, cal.get("cuda_norm_factor", CUDA_NORM_FACTOR))
    kf = 1.0 if run.checkpointing else k  # a checkpointed forward keeps block inputs only (no norm outputs)
    if k != 1.0:
        where = "nbkit.memory.actmodel.CUDA_NORM_FACTOR" if "cuda_norm_factor" not in cal else "measured for this UNet"
        notes.append(f"CUDA autocast runs group_norm / layer_norm in fp32: saved activations x{k:g} "
                     f"({where}){', in the recomputing backward' if kf == 1 else ''}.")
    forward = row["F0"] + per * row["Fs"] * kf
    backward = row["B0"] + per * row["Bs"] * k - row["G"]
    # DDP's backward, measured with every gradient held (memtrace grads_held); else, as if none had appeared
    # at the backward peak yet (an upper bound)
    held = row["H0"] + per * row["Hs"] * k if "H0" in row else backward + row["G"]
    step = max(forward - (0 if run.accumulating and not run.in_backward else row["G"]), backward)
    if run.deepspeed:  # DeepSpeed keeps the model in fp16: no autocast copies, gradients in its own buckets
        step = per * max(row["Fs"] * kf, row["Bs"] * k)
        notes.append("DeepSpeed activations estimated from the per-sample part of the calibration (not measured).")
    floor = 0 if run.cache_latents else cal.get("vae_encode_per_image", 0) * per * scale
    if fp32_from_half:
        scale *= 2
        notes.append("fp32 activations estimated as twice the calibrated half-precision ones.")
    single = max(max(step, 0) * scale, floor)
    # the calibrated volume, without the norm factor: the planner's fragmentation multiple of it was fitted to
    # GPU measurements, which hold the fp32 norms already (the factor on it would count them twice)
    volume = per * row["Fs"] * scale
    return int(single), int(volume), notes, Step(forward, backward, held, scale, floor, single)


def norm_factor(run: Run, factor: float = CUDA_NORM_FACTOR) -> float:
    """CUDA_NORM_FACTOR under 16-bit autocast on CUDA (the calibration's CPU autocast keeps norms in 16 bits);
    1 otherwise: fp32 training has no autocast (the norms are fp32 either way, and the fp32 estimate doubles a
    16-bit calibration), and DeepSpeed runs the model in fp16 without autocast (norms in fp16 as calibrated)."""
    return factor if run.cuda and run.half and not run.deepspeed else 1.0


def deepspeed_bucket(path: str) -> int:
    """Elements in one of DeepSpeed ZeRO's reduce buckets (its config's reduce_bucket_size; 5e8 by default)."""
    try:
        z = json.loads(Path(path).read_text()).get("zero_optimization", {})
        return int(float(z.get("reduce_bucket_size", 5e8)))
    except (OSError, ValueError):
        return int(5e8)


def ddp_buckets(step: Step, grad_bytes: int, bucket_view: bool = True) -> int:
    """Bytes DDP adds to one process's peak (the planner's DDP row).

    DDP's Reducer allocates a bucket for every trained parameter's gradient once and keeps it, so
    `zero_grad(set_to_none=True)` frees nothing. With gradient_as_bucket_view=True the gradients are views of
    the buckets, no second copy (each is made by autograd, copied in and freed: one at a time), but they are
    held through the whole step: the forward pass and the start of backward, where activations peak, now run
    next to every gradient. With False the buckets are a second copy of the gradients: `grad_bytes`. The
    bucket size (bucket_cap_mb=25, the first bucket 1 MiB) only groups the gradients: no bytes of its own.
    """
    if not bucket_view:
        return int(grad_bytes)
    held = max(step.forward * step.scale, step.held * step.scale, step.floor)
    return int(max(held - step.single, 0))
