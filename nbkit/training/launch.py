"""Launching from a notebook or a shell (nbkit.training.launch) on the Accelerator of nbkit.training.accel.

The same `nbkit.train` runs
- in a notebook, on one GPU (or the CPU): `nbkit.train(cfg)`;
- in a notebook, on all the GPUs of the machine (Kaggle's 2x T4): `nbkit.training.launch.notebook(cfg)`. It writes cfg
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

from nbkit.config import TrainConfig
from nbkit.paths import ROOT

CONFIG_FILE = "launch_config.json"  # what launch.notebook hands the processes, in the output folder


class LaunchError(RuntimeError):
    """The processes started by `launch.notebook` failed; the message holds the last lines of their output."""


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
        from nbkit.training.loop import train

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


# What a run file always spells out, default or not: the settings a learner checks and edits first.
SHOWN = ("model", "instance_dir", "identifier", "instance_prompt", "resolution", "max_train_steps", "learning_rate",
         "train_batch_size", "seed", "output_dir")


def deepspeed_command(cfg: TrainConfig, file: str | Path) -> tuple[Path, str]:
    """The 8gb-deepspeed recipe, for a shell: writes `file` (cfg's settings as JSON, without the memory settings the
    preset sets when the run starts) and returns (file, the `accelerate launch` line that trains it). Run that line
    from the kit's folder on the machine with the 8 GB GPU, ~25 GB of RAM and `pip install deepspeed`; DeepSpeed
    starts its own process, so it cannot run inside a notebook's kernel, nor on a CPU."""
    from nbkit.env.runtime import SD15, Runtime
    from nbkit.training.presets import accelerate_config_path, settings

    if cfg.train_text_encoder or cfg.method != "dreambooth":
        raise ValueError("The 8gb-deepspeed preset trains the UNet only (DreamBooth, train_text_encoder=False): "
                         "accelerate prepares one model for DeepSpeed. For the text encoder on 8 GB use PRESET='8gb'.")
    by_preset = set(settings("8gb-deepspeed", Runtime("local", "cuda", "GPU", 1, 8.0, False), cfg))
    default = TrainConfig().to_dict()
    fields = {k: v for k, v in cfg.to_dict().items() if k not in by_preset and (v != default[k] or k in SHOWN)}
    if fields.get("model") == "sd15":  # the planner's name for SD 1.5's architecture: train the real one
        fields["model"] = SD15
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(fields, indent=1))
    acc = accelerate_config_path()
    acc = acc.relative_to(ROOT) if acc.is_relative_to(ROOT) else acc
    return file, shlex.join(["accelerate", "launch", "--config_file", acc.as_posix(), "-m", "nbkit", "train",
                             "--config", str(file), "--preset", "8gb-deepspeed"])


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
