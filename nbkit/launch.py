"""One GPU, several GPUs, or DeepSpeed: the Accelerator the training loop runs under, and launching from a notebook.

The same `nbkit.train` runs
- in a notebook, on one GPU (or the CPU): `nbkit.train(cfg)`;
- in a notebook, on all the GPUs of the machine (Kaggle's 2x T4): `nbkit.launch.notebook(cfg)`. It writes cfg
  to output_dir/launch_config.json and runs `accelerate launch -m nbkit train --config` on it in new
  processes, their output printed in the notebook: it works after an `nbkit.train` in the same kernel too;
- from a shell: `accelerate launch -m nbkit train --config run.yaml` (see `nbkit.cli`), any number of GPUs;
- with DeepSpeed ZeRO-2 and CPU offload (the `8gb-deepspeed` preset): `accelerate launch --config_file
  configs/accelerate/deepspeed_zero2_offload.yaml -m nbkit train --config run.yaml --preset 8gb-deepspeed`.

Each process draws its own samples, so one optimizer update sees batch x accumulation x processes images
(the effective batch, printed at the start; with prior preservation as many class images again). Under DDP
the gradients are views into DDP's all-reduce buckets (gradient_as_bucket_view): no second copy of them.
"""

from __future__ import annotations

import collections
import io
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from .config import TrainConfig
from .paths import ROOT

CONFIG_FILE = "launch_config.json"  # what launch.notebook hands the processes, in the output folder


class LaunchError(RuntimeError):
    """The processes started by `launch.notebook` failed; the message holds the last lines of their output."""


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

    # No autocast weight cache: each trained fp32 weight is cast to half precision where it is used. The cache
    # would hold a half copy of every trained weight through the whole forward pass (1.6 GiB for SD 1.5's
    # UNet), which gradient checkpointing never needs; without checkpointing the copies are kept for backward
    # either way. Every weight is used once per forward, so nothing is cast twice.
    # DDP: gradients as views into the all-reduce buckets (its default keeps a second copy of every gradient,
    # 3.2 GiB for SD 1.5's UNet); when the text encoder stops receiving gradients part-way, DDP must not wait.
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True,
                                        find_unused_parameters=cfg.text_encoder_steps is not None and world_size() > 1)
    kw: dict = dict(mixed_precision=precision, cpu=cpu, kwargs_handlers=[AutocastKwargs(cache_enabled=False), ddp])
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


def notebook(cfg: TrainConfig, num_processes: int | None = None, cpu: bool = False):
    """Train on every GPU of this machine from a notebook: `accelerate launch -m nbkit train` in new processes.

    With one GPU or none this is just `nbkit.train(cfg)` and returns its TrainResult. With several (or cpu=True)
    the processes' output is printed here as it comes and this returns cfg.output_dir (the model is in its
    model/ folder); a failed run raises LaunchError with the last lines of their output. cpu=True: processes
    on the CPU (gloo), the GPUs hidden from them.
    """
    import torch

    cfg.validate()
    n = num_processes if num_processes is not None else 1 if cpu else max(1, torch.cuda.device_count())
    if n < 1:
        raise ValueError(f"num_processes={num_processes}: must be at least 1 (None: one per GPU).")
    if n == 1 and not cpu:
        from .train import train

        return train(cfg)
    _free_kernel_gpu()
    cmd, env = command(cfg, n, cpu)
    _stream(cmd, env)
    return Path(cfg.output_dir)


def command(cfg: TrainConfig, num_processes: int, cpu: bool = False) -> tuple[list[str], dict]:
    """(the `accelerate launch` command that trains cfg in num_processes processes, its environment); writes
    cfg to output_dir/launch_config.json, which the command reads (every field given: no preset changes it)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = (out / CONFIG_FILE).resolve()
    file.write_text(json.dumps(cfg.to_dict(), indent=1))
    # --mixed_precision only quiets accelerate's warning: the loop passes its own precision to the Accelerator
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # several processes: torchrun starts them (--multi_gpu; with cpu=True on the CPU, as ACCELERATE_USE_CPU says)
    cmd += ["--multi_gpu"] if num_processes > 1 else ["--cpu"] if cpu else []
    cmd += ["-m", "nbkit", "train", "--config", str(file)]
    root = str(ROOT)  # the processes import this nbkit
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    return cmd, env


def _stream(cmd: list[str], env: dict, keep: int = 60) -> None:
    """Run cmd, printing its output as it comes (progress bars redraw in place); LaunchError if it fails."""
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
            print(line, end="", flush=True)
            if line.strip():
                tail.append(line.rstrip())
        rc = proc.wait()
    except BaseException:  # the cell was interrupted: stop every process the launch started
        _stop(proc)
        raise
    if rc:
        raise LaunchError(f"accelerate launch failed (exit code {rc}). The last lines of its output:\n"
                          + "\n".join(tail) + f"\nThe command was: {shlex.join(cmd)}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and the processes it started (one session): politely, then for good."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _free_kernel_gpu() -> None:
    """Hand the GPU memory this kernel caches back to the driver: the training processes need it."""
    import gc

    import torch

    if not torch.cuda.is_initialized():
        return
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated() / 2**30
    if held > 0.5:
        print(f"note: this notebook still holds {held:.1f} GiB on its GPU (a model from an earlier run?): the "
              "training processes share that GPU with it. `del` what holds it if they run out of memory.")
