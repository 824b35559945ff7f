"""nbkit: the helper package of the Stable Diffusion fine-tuning course.

One module per concern: config (settings), runtime (where we run), models (loading), data (images),
methods (what trains), train (the one loop), checkpoint (resumable checkpoints), guards (disk, folders, out of
memory, non-finite loss), manifest (how a run was made), safeio (safetensors out, weights-only pickles in),
prior (class images), sample (schedulers, generation, grids), compare (same-seed comparisons, the scheduler grid),
export (the formats a model is taken home in), offline (the bundled model), toyworld (its data), evaluate (subject
and prompt fidelity, class drift: CLIP/DINO or the toy judge), tracking (scores while training, the best model).
Imported on their own: takehome (a run's formats in one call, each reloaded and checked), singlefile (the original
SD layout), hub (model card, upload), colab (runtime check, Drive, folders), course, widgets, sweep (papermill grids).
For memory and speed: memory (what training costs, in words and tables), presets (settings per GPU), planner
(predicted peak memory), memtrace (measured allocations), optim (optimizer, in backward), launch (multi-GPU,
DeepSpeed, every GPU from a notebook), cli (`python -m nbkit`, `accelerate launch -m nbkit`), sd15 (SD 1.5's
architecture without weights).
For studies: sweep (any notebook over a grid of parameters with papermill, resumable; `python -m nbkit.sweep`).
"""

from . import (checkpoint, compare, data, evaluate, export, guards, manifest, memory, offline, planner, plots, presets,
               prior, runtime, sample, tracking)
from .checkpoint import ResumeError
from .config import ConfigError, TrainConfig
from .data import DataError
from .guards import DiskSpaceError, NotWritable, OutOfMemory
from .models import ModelNotFound, SDParts, load_parts, pipeline
from .sample import SCHEDULERS, generate, grid, set_scheduler
from .train import TrainResult, train

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "DiskSpaceError", "ModelNotFound", "NotWritable", "OutOfMemory", "ResumeError",
           "SCHEDULERS", "SDParts", "TrainConfig", "TrainResult", "generate", "grid", "load_parts", "pipeline", "set_scheduler", "train"]
