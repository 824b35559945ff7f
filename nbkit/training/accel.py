"""The Accelerator a run trains under: mixed precision, DDP options, DeepSpeed; the run's process count and
effective batch. Used by the training loop (nbkit.train) and by the launcher (nbkit.training.launch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nbkit.config import TrainConfig
from nbkit.training import trackers


def world_size() -> int:
    """Processes in this run (accelerate launch sets WORLD_SIZE); 1 otherwise."""
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

    if world_size() == 1:  # one process: a kernel that trained in one precision may train in another
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()  # accelerate's singleton refuses a second mixed_precision otherwise

    # No autocast weight cache: each trained fp32 weight is cast to half precision where it is used. The cache
    # would hold a half copy of every trained weight through the whole forward pass (1.6 GiB for SD 1.5's
    # UNet), which gradient checkpointing never needs; without checkpointing the copies are kept for backward
    # either way. Every weight is used once per forward, so nothing is cast twice.
    # DDP: gradients as views into the all-reduce buckets (its default keeps a second copy of every gradient,
    # 3.2 GiB for SD 1.5's UNet); when the text encoder stops receiving gradients part-way, DDP must not wait.
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True,
                                        find_unused_parameters=cfg.text_encoder_steps is not None and world_size() > 1)
    kw: dict = dict(mixed_precision=precision, cpu=cpu, kwargs_handlers=[AutocastKwargs(cache_enabled=False), ddp])
    kw.update(trackers.accelerator_kwargs(cfg))  # report_to: TensorBoard, wandb, ...
    if cfg.deepspeed_config:
        kw["deepspeed_plugin"] = deepspeed_plugin(cfg)
        _single_process_env()
    return Accelerator(**kw)


def deepspeed_plugin(cfg: TrainConfig):
    """accelerate's DeepSpeedPlugin for cfg.deepspeed_config, with the run's batch size and clipping filled in."""
    cfg.validate(check_paths=False)  # what DeepSpeed cannot train (TrainConfig._deepspeed_problems) comes first
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "deepspeed_config is set but DeepSpeed is not installed: `pip install deepspeed` (Linux + CUDA), "
            "or use PRESET='8gb' (optimizer in backward, no offload) instead."
        ) from err
    from accelerate.utils import DeepSpeedPlugin

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
