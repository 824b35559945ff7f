"""Experiment trackers through accelerate: TensorBoard, Weights & Biases, ... as the diffusers examples use them.

`report_to` names accelerate's trackers ("tensorboard", "wandb", comma-separated, "all"), "none", or "auto" (the
default): TensorBoard when it is installed (Colab has it), else none. The loop logs, on the main process:

    loss, lr and each loss term           every step           (train/loss, train/lr, train/prior_loss, ...)
    the scores of eval_steps              every evaluation     (eval/subject_fidelity, eval/tradeoff, ...)
    the validation grid                   every validation     (validation, as an image)

into `logging_dir` (default output_dir/logs); in a notebook, `%load_ext tensorboard` then
`%tensorboard --logdir outputs/01_dreambooth/logs` shows them. The JSON files (losses.json, metrics.json) are
written either way: the trackers are a view, not the record, so a resumed run's curve simply continues.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from nbkit.config import TrainConfig

PROJECT = "nbkit"  # the run's name in the trackers (wandb: the project)


def resolve(report_to: str) -> list[str]:
    """The tracker names to hand accelerate: "auto" is TensorBoard when installed, "none" is none."""
    names = [t.strip() for t in (report_to or "none").split(",") if t.strip() and t.strip() != "none"]
    if names == ["auto"]:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    missing = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        if name in missing and importlib.util.find_spec(missing[name]) is None:
            raise ImportError(f"report_to={report_to!r}: {name} is not installed: `pip install {missing[name]}`, or "
                              "report_to='none' (losses.json and metrics.json are written either way).")
    return names


def logging_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.logging_dir) if cfg.logging_dir else Path(cfg.output_dir) / "logs"


def accelerator_kwargs(cfg: TrainConfig) -> dict:
    """What accelerate.Accelerator needs to know of the trackers (empty when there are none)."""
    names = resolve(cfg.report_to)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": names, "project_config": ProjectConfiguration(project_dir=str(cfg.output_dir),
                                                                       logging_dir=str(logging_dir(cfg)))}


class Trackers:
    """The loop's one handle on the trackers: start, step, scores, image, end. Does nothing without trackers."""

    def __init__(self, accelerator, cfg: TrainConfig):
        self.accelerator = accelerator
        self.on = bool(getattr(accelerator, "log_with", None)) and accelerator.is_main_process
        if getattr(accelerator, "log_with", None):  # every process calls it; accelerate keeps the main one's
            accelerator.init_trackers(PROJECT, config=_flat(cfg.to_dict()))

    def step(self, row: dict) -> None:
        """One training step's row of losses.json: loss, lr and the loss terms."""
        if self.on:
            step = row["step"]
            self.accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step" and _number(v)}, step=step)

    def scores(self, row: dict | None) -> None:
        """One evaluation's row of metrics.json."""
        if self.on and row:
            self.accelerator.log({f"eval/{k}": v for k, v in row.items() if k != "step" and _number(v)},
                                 step=row["step"])

    def image(self, path: Path, step: int, name: str = "validation") -> None:
        """A picture written by the loop (the validation grid), as an image in each tracker."""
        if not self.on:
            return
        from PIL import Image

        picture = np.asarray(Image.open(path).convert("RGB"))
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, picture, step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(picture)}, step=step)

    def end(self) -> None:
        if getattr(self.accelerator, "log_with", None):
            self.accelerator.end_training()  # flushes the event files


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flat(d: dict) -> dict:
    """Hyper-parameters as trackers take them: numbers, strings and booleans (lists as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in d.items()}
