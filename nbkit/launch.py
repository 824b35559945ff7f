"""One GPU, several GPUs, or DeepSpeed: the Accelerator the training loop runs under, and launching from a notebook.

The same `nbkit.train` runs
- in a notebook, on one GPU (or the CPU): `nbkit.train(cfg)`;
- in a notebook, on all the GPUs of the machine (Kaggle's 2x T4): `nbkit.launch.notebook(cfg)`, which uses
  `accelerate.notebook_launcher` (restart the kernel first if anything has touched the GPU: CUDA cannot be
  forked once initialised; `runtime.detect()` does not initialise it);
- from a shell: `accelerate launch -m nbkit train --config run.yaml` (see `nbkit.cli`), any number of GPUs;
- with DeepSpeed ZeRO-2 and CPU offload (the `8gb-deepspeed` preset): `accelerate launch --config_file
  configs/accelerate/deepspeed_zero2_offload.yaml -m nbkit train --config run.yaml --preset 8gb-deepspeed`.

Each process draws its own samples, so one optimizer update sees batch x accumulation x processes images
(the effective batch, printed at the start; with prior preservation as many class images again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import TrainConfig


def world_size() -> int:
    """Processes in this run (accelerate launch / notebook_launcher set WORLD_SIZE); 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def effective_batch(cfg: TrainConfig, num_processes: int) -> tuple[int, str]:
    """(images per optimizer update, the sentence that says so)."""
    n = cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes
    s = (f"effective batch {n} = {cfg.train_batch_size} per step x {cfg.gradient_accumulation_steps} accumulation "
         f"x {num_processes} process{'es' if num_processes > 1 else ''}")
    if cfg.with_prior_preservation:
        s += " (+ as many class images)"
    return n, s


def make_accelerator(cfg: TrainConfig, precision: str, cpu: bool):
    """The Accelerator for a run: mixed precision, DDP options, and DeepSpeed when cfg.deepspeed_config is set."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs

    # No autocast weight cache: each trained fp32 weight is cast to half precision where it is used. The cache
    # would hold a half copy of every trained weight through the whole forward pass (1.6 GiB for SD 1.5's
    # UNet), which gradient checkpointing never needs; without checkpointing the copies are kept for backward
    # either way. Every weight is used once per forward, so nothing is cast twice.
    handlers: list = [AutocastKwargs(cache_enabled=False)]
    if cfg.text_encoder_steps is not None and world_size() > 1:
        # the text encoder stops receiving gradients part-way: DDP must not wait for them
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    kw: dict = dict(mixed_precision=precision, cpu=cpu, kwargs_handlers=handlers)
    if cfg.deepspeed_config:
        kw["deepspeed_plugin"] = deepspeed_plugin(cfg)
        _single_process_env()
    return Accelerator(**kw)


def deepspeed_plugin(cfg: TrainConfig):
    """accelerate's DeepSpeedPlugin for cfg.deepspeed_config, with the run's batch size and clipping filled in."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "deepspeed_config is set but DeepSpeed is not installed: `pip install deepspeed` (Linux + CUDA), "
            "or use PRESET='8gb' (optimizer in backward, no offload) instead."
        ) from err
    from accelerate.utils import DeepSpeedPlugin

    if cfg.train_text_encoder:
        raise ValueError("DeepSpeed here trains the UNet only (accelerate prepares one model for it): set "
                         "train_text_encoder=False, or use PRESET='8gb' to train the text encoder on 8 GB.")
    if cfg.gradient_accumulation_steps != 1:
        raise ValueError("With DeepSpeed use gradient_accumulation_steps=1 (DeepSpeed would scale the loss a "
                         "second time); raise train_batch_size instead.")
    ds = load_deepspeed_config(cfg.deepspeed_config)
    ds["train_micro_batch_size_per_gpu"] = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0
    ds.pop("train_batch_size", None)
    return DeepSpeedPlugin(hf_ds_config=ds)


def load_deepspeed_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON, saying clearly what is wrong with it."""
    try:
        ds = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist.") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {str(path)!r} is not valid JSON: {err}") from err
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed config {str(path)!r}: zero_optimization.stage must be 1, 2 or 3 (got {stage!r}).")
    return ds


def _single_process_env() -> None:
    """DeepSpeed wants a process group even for one process: outside `accelerate launch`, make one."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    for k, v in (("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29512"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                 ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)


def _worker(cfg_dict: dict) -> None:
    from .train import train

    train(TrainConfig(**cfg_dict), progress=int(os.environ.get("RANK", "0")) == 0)


def notebook(cfg: TrainConfig, num_processes: int | None = None):
    """Train on every GPU of this machine from a notebook (accelerate.notebook_launcher).

    With one GPU or none this is just `nbkit.train(cfg)` and returns its TrainResult; with several, the
    processes write cfg.output_dir and this returns that folder (load the model from it).
    """
    import torch

    n = num_processes or max(1, torch.cuda.device_count())
    cfg.validate()
    if n == 1:
        from .train import train

        return train(cfg)
    from accelerate import notebook_launcher

    print(effective_batch(cfg, n)[1])
    notebook_launcher(_worker, (cfg.to_dict(),), num_processes=n)
    return Path(cfg.output_dir)
