"""nbkit: the helper package of the Stable Diffusion fine-tuning course.

One module per concern: config (settings), runtime (where we run), models (loading), data (images),
methods (what trains), train (the one loop), prior (class images), sample (schedulers, generation, grids),
offline (the bundled model), toyworld (the data it knows); for memory and speed: presets (settings per GPU),
planner (predicted peak memory), memtrace (measured allocations), optim (optimizer, in backward), launch
(multi-GPU, DeepSpeed, notebook_launcher), cli (`python -m nbkit`, `accelerate launch -m nbkit`), sd15 (SD 1.5's
architecture without weights).
"""

from . import data, offline, planner, plots, presets, runtime, sample
from .config import ConfigError, TrainConfig
from .data import DataError
from .models import ModelNotFound, SDParts, load_parts, pipeline
from .sample import SCHEDULERS, generate, grid, set_scheduler
from .train import TrainResult, train

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "ModelNotFound", "SCHEDULERS", "SDParts", "TrainConfig", "TrainResult",
           "generate", "grid", "load_parts", "pipeline", "set_scheduler", "train"]
