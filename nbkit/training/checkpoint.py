"""Resumable checkpoints: a run killed at any moment continues where it stopped, to the same weights.

A checkpoint is a folder `step_NNNNNN/` holding everything the next step depends on:

- `weights-*.safetensors`: only what trains (the UNet and/or text encoder for DreamBooth, the adapters for LoRA,
  the embedding for Textual Inversion), in full precision;
- `optimizer-*.safetensors`: every tensor of the optimizer's state dict (sharded: never more than ~1 GB in RAM at
  once); its structure and plain values go into `checkpoint.json` (nbkit.safeio.split_tree: any optimizer's
  state dict, at any depth: torch AdamW, bitsandbytes' 8-bit AdamW, the optimizer in backward's list of them);
- `ema-*.safetensors` (use_ema): the average of the trained weights (nbkit.training.ema), its step count in
  `checkpoint.json`;
- `rng.safetensors` and `checkpoint.json`: the step, LR schedule, GradScaler, RNG states, the settings and a
  fingerprint of the training pictures (the data order is a function of (seed, step), see data.batch_indices),
  the loss log, the validation grids and the metrics rows so far (nbkit.scores.tracking), and the size of every file.

It is written into a hidden temporary folder, every file fsync'ed, `checkpoint.json` last, then renamed into
place: a folder named `step_NNNNNN` with a `checkpoint.json` whose file sizes match is complete, anything else
(a run killed mid-write, a copy still syncing to Drive) is never picked up. Only the newest
`checkpoints_total_limit` are kept. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nbkit.config import TrainConfig
from nbkit.safeio import fsync_write, join_tree, load_sharded, save_sharded, save_tensors, split_tree, swap_folder
from nbkit.training.optim import adam_state_bytes

INFO = "checkpoint.json"
FORMAT = 2  # 2: the optimizer state through safeio.split_tree (1: {"state", "param_groups"} only)
NAME = re.compile(r"^step_(\d{6,})$")
# Settings that may change between an interrupted run and its resumption: where things go, how often to
# checkpoint or sample, how long to train, and speed/memory settings that leave the maths alone.
MAY_CHANGE = {
    "output_dir", "checkpoints_dir", "checkpointing_steps", "checkpoints_total_limit", "resume", "max_train_steps",
    "mixed_precision", "gradient_checkpointing", "validation_prompts", "validation_steps", "num_validation_images",
    "sample_scheduler", "sample_steps", "guidance_scale", "save_dtype", "instance_dir", "class_dir", "concepts_list",
    "eval_steps", "eval_seeds", "keep_best", "report_to", "logging_dir",
}


class ResumeError(ValueError):
    """A checkpoint cannot be continued with these settings; the message says what differs and what to do."""


def folder(cfg: TrainConfig) -> Path:
    """Where the run's checkpoints go: cfg.checkpoints_dir, or output_dir/checkpoints."""
    return Path(cfg.checkpoints_dir) if cfg.checkpoints_dir else Path(cfg.output_dir) / "checkpoints"


def step_of(path: str | Path) -> int:
    return int(NAME.match(Path(path).name).group(1))


@dataclass
class Resumable:
    """The live objects a checkpoint saves and restores."""

    params: dict[str, torch.nn.Parameter]  # what trains, by name ("unet.…", "text_encoder.…", "text_encoder_2.…")
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: object | None = None  # accelerate's GradScaler (fp16 only)
    ema: object | None = None  # nbkit.training.ema.Ema (use_ema): the average, saved as ema-*.safetensors


@dataclass
class Progress:
    """What the loop carries from one session to the next besides the live objects."""

    step: int = 0
    log: list[dict] = field(default_factory=list)  # one row per step: loss, lr, loss terms
    validation: dict[int, Path] = field(default_factory=dict)  # step -> grid image
    resumed_from: Path | None = None
    metrics: list[dict] = field(default_factory=list)  # one row per evaluation (nbkit.scores.tracking)
    best: dict | None = None  # the best model so far (nbkit.scores.tracking)


def trainable_params(parts, method) -> dict[str, torch.nn.Parameter]:
    """The method's trainable parameters, named after the module that owns them."""
    ids = {id(p) for p in method.params}
    mods = {n: m for n, m in parts.networks.items() if n != "vae"}
    named = {f"{prefix}.{n}": p for prefix, m in mods.items() for n, p in m.named_parameters() if id(p) in ids}
    if len(named) != len(ids):
        raise RuntimeError("some trainable parameters belong to neither the UNet nor a text encoder")
    return named


def data_fingerprint(groups: dict[str, list[tuple[Path, str]]]) -> dict:
    """{group: {"count", "sha256"}} over each example's file bytes and prompt: did the training data change?"""
    out = {}
    for name, items in groups.items():
        h = hashlib.sha256()
        for path, prompt in items:
            h.update(hashlib.sha256(Path(path).read_bytes()).digest() + prompt.encode() + b"\0")
        out[name] = {"count": len(items), "sha256": h.hexdigest()}
    return out


def estimate_bytes(params: list[torch.nn.Parameter], eight_bit_adam: bool, ema: bool = False) -> int:
    """About how big one checkpoint of these parameters is on disk (fp32 weights, and their EMA, + AdamW moments +
    1 MiB)."""
    numels = [p.numel() for p in params]
    return sum(numels) * (8 if ema else 4) + adam_state_bytes(numels, eight_bit_adam) + (1 << 20)


# --- listing ----------------------------------------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    """A checkpoint folder whose checkpoint.json is readable and whose files all have their recorded sizes."""
    try:
        info = json.loads((path / INFO).read_text())
        return all((path / n).stat().st_size == size for n, size in info["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


class Checkpoints:
    """The checkpoints of one run, in one folder."""

    def __init__(self, root: str | Path, limit: int | None = None):
        self.root = Path(root)
        self.limit = limit
        self._replace_on_save: list[Path] = []

    def _named(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and NAME.match(p.name)), key=step_of)

    def complete(self, quiet: bool = False) -> list[Path]:
        """Complete checkpoints, oldest first; incomplete ones are named in a warning and skipped."""
        good = []
        for p in self._named():
            if is_complete(p):
                good.append(p)
            elif not quiet:
                warnings.warn(f"{p} is incomplete (a run stopped while writing it, or a copy is still syncing): "
                              "it is skipped.")
        return good

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def find(self, resume: str | None, cfg: TrainConfig | None = None) -> Path | None:
        """The checkpoint to continue from: resume='auto' -> the latest complete one; a folder -> that one.

        With `cfg`, its settings are checked against the checkpoint's at once (before any model is loaded).
        """
        if resume in (None, "never"):
            return None
        path = self.latest() if resume == "auto" else Path(resume)
        if path is not None and (not NAME.match(path.name) or not is_complete(path)):
            raise ResumeError(f"resume={resume!r} is not a complete checkpoint folder. Complete ones in {self.root}: "
                              f"{[p.name for p in self.complete(quiet=True)] or 'none'}; or use resume='auto' or None.")
        if path is not None and cfg is not None:
            check_compatible(read_info(path), cfg, None, path)
        return path

    def resume_point(self, cfg: TrainConfig) -> Path | None:
        """At the start of a run: drop half-written leftovers, then find the checkpoint to continue from
        (cfg.resume), checking its settings against cfg; with resume=None, plan to replace the old ones."""
        self.clean_partial()
        found = self.find(cfg.resume, cfg)
        if cfg.resume in (None, "never"):
            self.start_over()
        return found

    def start_over(self) -> None:
        """resume=None: this run's first checkpoint replaces those of an earlier run (kept until then)."""
        self._replace_on_save = self._named()
        if self._replace_on_save:
            print(f"resume=None: starting over. The {len(self._replace_on_save)} checkpoint(s) of an earlier run in "
                  f"{self.root} will be deleted when this run writes its first checkpoint.")

    def clean_partial(self) -> None:
        """Remove temporary folders left by a run killed while writing a checkpoint."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-step_", ".old-step_")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)

    # --- writing ------------------------------------------------------------------------------------------------

    def save(self, step: int, res: Resumable, state: dict) -> Path:
        """Write checkpoint `step` atomically, then delete the oldest beyond the limit; return its folder."""
        opt_state = optimizer_state(res.optimizer)  # refused (DeepSpeed) before anything is written
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-step_{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = save_sharded(res.params.items(), tmp, "weights")
        opt_tensors, opt_rest = split_tree(opt_state)
        optimizer = save_sharded(opt_tensors.items(), tmp, "optimizer")
        rng_tensors, rng_rest = _rng_state()
        save_tensors(rng_tensors, tmp / "rng.safetensors")
        ema = res.ema.save(tmp) if res.ema is not None else None
        info = {
            "format": FORMAT, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **state,
            "weights": weights, "optimizer_files": optimizer, "optimizer": opt_rest,
            "lr_scheduler": res.lr_scheduler.state_dict(),
            "scaler": res.scaler.state_dict() if res.scaler is not None else None, "rng": rng_rest, "ema": ema,
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        }
        fsync_write(tmp / INFO, json.dumps(info, indent=1).encode())  # last: its presence marks a whole checkpoint
        # a final that exists: the same step written again (a run resumed from an earlier checkpoint)
        swap_folder(tmp, final, self.root / f".old-step_{step:06d}-{os.getpid()}")
        for p in self._replace_on_save:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
        self._replace_on_save = []
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest `limit` complete checkpoints."""
        if self.limit is None:
            return
        for p in self.complete(quiet=True)[:-self.limit]:
            shutil.rmtree(p, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------------------------

def read_info(path: str | Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise ResumeError(f"{path} is not a complete checkpoint (missing or short files): pick another one, or "
                          "resume='auto' to take the latest complete one.")
    return json.loads((path / INFO).read_text())


def check_compatible(info: dict, cfg: TrainConfig, data: dict | None, path: Path) -> list[str]:
    """Raise ResumeError if the checkpoint was made with other training settings or data (None: not checked);
    return notes on the settings that changed and may."""
    old, new = info.get("config", {}), cfg.to_dict()
    differ = [f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in new
              if k in old and k not in MAY_CHANGE and old[k] != new[k]]
    for group, fp in info.get("data", {}).items() if data is not None else ():
        now = data.get(group)
        if now != fp:
            differ.append(f"the {group} pictures or their captions changed ({fp['count']} then, "
                          f"{now['count'] if now else 0} now)")
    if info["step"] > cfg.max_train_steps:
        differ.append(f"the checkpoint is at step {info['step']}, beyond max_train_steps={cfg.max_train_steps}")
    if differ:
        raise ResumeError(
            f"Cannot continue from {path}: it was made with other settings.\n  - " + "\n  - ".join(differ) +
            "\nSet them back to continue from it, or start a new run: a new output_dir (or checkpoints_dir), or "
            "resume=None (this run's first checkpoint then replaces the old ones)."
        )
    notes = [f"{k} changed: {old[k]!r} -> {new[k]!r}" for k in ("max_train_steps", "mixed_precision")
             if k in old and old[k] != new[k]]
    return notes


def restore(path: str | Path, res: Resumable) -> dict:
    """Load a checkpoint into the live objects (weights, optimizer, LR schedule, scaler, RNGs); return its info."""
    from safetensors import safe_open

    path = Path(path)
    info = read_info(path)
    missing = set(res.params)
    for name in info["weights"]:
        with safe_open(str(path / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in res.params:
                    raise ResumeError(f"{path} holds {key!r}, which this run does not train: it was made by another "
                                      "method or model.")
                p = res.params[key]
                with torch.no_grad():
                    p.copy_(f.get_tensor(key).to(p.device, p.dtype))
                missing.discard(key)
    if missing:
        raise ResumeError(f"{path} lacks {len(missing)} trained tensors (e.g. {sorted(missing)[0]!r}): it was made by "
                          "another method or model.")
    device = next(iter(res.params.values())).device  # moments go straight to the GPU, not through RAM
    moments = load_sharded(path, info["optimizer_files"], lambda key: "cpu" if key.endswith("/step") else device)
    if info.get("format", 1) == 1:
        state = _join_optimizer_v1(info["optimizer"], moments, res.optimizer)
    else:
        state = join_tree(info["optimizer"], moments)
    res.optimizer.load_state_dict(state)
    res.lr_scheduler.load_state_dict(info["lr_scheduler"])
    if res.scaler is not None and info.get("scaler"):
        res.scaler.load_state_dict(info["scaler"])
    _set_rng_state(load_sharded(path, ["rng.safetensors"], lambda key: "cpu"), info["rng"])
    if res.ema is not None:
        if not info.get("ema"):
            raise ResumeError(f"{path} holds no EMA of the weights (it was made with use_ema=False): resume it with "
                              "use_ema=False, or start over (resume=None).")
        try:
            res.ema.load(path, info["ema"])
        except KeyError as err:
            raise ResumeError(f"{err.args[0]}: it was made by another method or model.") from None
    return info


def resume(path: str | Path, res: Resumable, cfg: TrainConfig, data: dict, output_dir: str | Path) -> Progress:
    """Check the checkpoint fits this run, restore it, say so; return where the loop continues."""
    path = Path(path)
    info = read_info(path)
    notes = check_compatible(info, cfg, data, path)
    restore(path, res)
    out = Path(output_dir)
    validation = {int(s): out / rel for s, rel in info.get("validation", {}).items() if (out / rel).exists()}
    left = cfg.max_train_steps - info["step"]
    print(f"Resuming from {path} (step {info['step']} of {cfg.max_train_steps}): trained weights, optimizer, LR "
          f"schedule, RNG states and data order restored; {left} step(s) to go."
          + "".join(f" Note: {n}." for n in notes))
    return Progress(info["step"], info.get("log", []), validation, path, info.get("metrics", []), info.get("best"))


# --- state <-> (tensors, JSON) ----------------------------------------------------------------------------------

def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict, refused with what to do for an optimizer that these checkpoints cannot restore.

    DeepSpeed's ZeRO optimizer keeps this process's partition of the fp32 master weights and a loss-scaler object
    in its state, and restores it only through its engine (`accelerator.save_state`, which pickles).
    """
    inner, seen = optimizer, []
    while inner is not None and len(seen) < 8:  # accelerate's wrappers keep the real optimizer in .optimizer
        seen.append(type(inner))
        inner = getattr(inner, "optimizer", None)
    if any(t.__module__.split(".")[0] == "deepspeed" or t.__name__ == "DeepSpeedOptimizerWrapper" for t in seen):
        raise ResumeError("checkpoints under DeepSpeed are not supported: its ZeRO optimizer can only be saved and "
                          "restored through the DeepSpeed engine. Set checkpointing_steps=0 for this run, or train "
                          "without DeepSpeed (the 8gb preset: 8-bit AdamW, optimizer in backward).")
    return optimizer.state_dict()


def _join_optimizer_v1(rest: dict, tensors: dict[str, torch.Tensor], optimizer) -> dict:
    """The optimizer state of a format-1 checkpoint (written before format 2: torch and bitsandbytes AdamW only)."""
    def walk(x):
        if isinstance(x, dict):
            return tensors[x["tensor"]] if set(x) == {"tensor"} else {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    state = {int(i): walk(s) for i, s in rest["state"].items()}  # JSON made the parameter indices strings
    groups = []
    for saved, live in zip(rest["param_groups"], optimizer.param_groups):  # ... and tuples (betas) lists
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    rest = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], *map(_plain, np_state[2:])]}
    return tensors, rest


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = rest["python"]
    random.setstate((v, tuple(state), gauss))
    kind, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _plain(x):
    return x.item() if hasattr(x, "item") else x
