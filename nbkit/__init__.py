"""nbkit: the helper package of the Stable Diffusion fine-tuning course.

The notebooks use only the curated API below: `import nbkit as nb`, then `nb.<name>` for a name in `__all__`
(`nb.setup`, `nb.TrainConfig`, `nb.tune`, `nb.train`, `nb.generate`, `nb.take_home`, ...). These names stay when
the modules move; the modules themselves are the kit's inside.

One module per concern: config (settings), runtime (where we run), models (loading), data (images),
methods (what trains), train (the one loop), checkpoint (resumable checkpoints), guards (disk, folders, out of
memory, non-finite loss), manifest (how a run was made), safeio (safetensors out, weights-only pickles in),
prior (class images), sample (schedulers, generation, grids), compare (same-seed comparisons, the scheduler grid),
export (the formats a model is taken home in), offline (the bundled model), toyworld (its data), evaluate (subject
and prompt fidelity, class drift: CLIP/DINO or the toy judge), tracking (scores while training, the best model),
setup (a notebook's first cell: runtime, model, folders, offline-or-SD values).
Also: takehome (a run's formats in one call, each reloaded and checked), singlefile (the original SD layout), hub
(model card, upload), colab (runtime check, Drive, folders), course, widgets, sweep (papermill grids).
For memory and speed: memory (what training costs, in words and tables), presets (settings per GPU), planner
(predicted peak memory), memtrace (measured allocations), optim (optimizer, in backward), launch (multi-GPU,
DeepSpeed, every GPU from a notebook), cli (`python -m nbkit`, `accelerate launch -m nbkit`), sd15 (SD 1.5's
architecture without weights).
For studies: sweep (any notebook over a grid of parameters with papermill, resumable; `python -m nbkit.sweep`).
"""

from . import (checkpoint, compare, data, evaluate, export, guards, manifest, memory, offline, planner, plots, presets,
               prior, runtime, sample, tracking)
from .checkpoint import ResumeError
from .colab import hub_cache_on_drive, mount_drive
from .colab import paths as course_paths
from .compare import embedding_shift, pixel_distance, scheduler_grid, side_by_side
from .config import ConfigError, TrainConfig
from .course import NOTEBOOKS
from .course import plot_memory as plot_course_memory
from .course import table as course_table
from .data import DataError, load_folder, thumbnail
from .evaluate import EvaluatorUnavailable
from .evaluate import for_run as evaluator_for_run
from .export import expand_prompt, human_size, load_embedding, lora_kohya, lora_rank_alpha, max_weight_diff
from .export import snapshot as snapshot_weights
from .guards import DiskSpaceError, NotWritable, OutOfMemory
from .hub import prefetch
from .judge import format_scores
from .judge import scores as judge_scores
from .manifest import summary as manifest_summary
from .memory import budget_table, sd15_on_meta, track_peak
from .memory import compare_settings as memory_budgets
from .models import ModelNotFound, SDParts, load_parts, pipeline
from .offline import offline_model_dir
from .plots import image_rows, loss_curve, loss_terms, metric_curves
from .tuning import preview, tune
from .prior import choose_class_images, ensure_class_images
from .sample import SCHEDULERS, generate, grid, save_images, set_scheduler, timed_generate
from .setup import Setup, setup
from .sweep import collect as collect_sweep
from .sweep import load_spec as load_sweep
from .sweep import markdown as sweep_table
from .sweep import notebook_parameters
from .sweep import plan as sweep_plan
from .sweep import plot_final as plot_sweep
from .sweep import run as run_sweep
from .sweep import score as score_sweep
from .takehome import pixel_difference, take_home
from .takehome import push as push_take_home
from .takehome import report as take_home_report
from .tracking import read_metrics
from .tracking import table as metrics_table
from .train import TrainResult, train
from .widgets import prompt_playground, upload_box

__version__ = "0.1.0"
__all__ = [
    # setting up a notebook
    "Setup", "setup", "NOTEBOOKS", "course_table", "plot_course_memory", "mount_drive", "course_paths",
    "hub_cache_on_drive", "prefetch", "offline_model_dir",
    # models, pictures, sampling
    "SDParts", "load_parts", "pipeline", "SCHEDULERS", "set_scheduler", "generate", "timed_generate", "grid",
    "save_images", "load_folder", "thumbnail", "upload_box", "prompt_playground",
    # training and memory
    "TrainConfig", "TrainResult", "train", "tune", "preview", "memory_budgets", "sd15_on_meta", "budget_table",
    "track_peak", "choose_class_images", "ensure_class_images",
    # looking at results
    "loss_curve", "loss_terms", "metric_curves", "image_rows", "side_by_side", "pixel_distance", "pixel_difference",
    "embedding_shift", "scheduler_grid", "read_metrics", "metrics_table", "manifest_summary", "evaluator_for_run",
    "judge_scores", "format_scores",
    # taking it home
    "take_home", "take_home_report", "push_take_home", "human_size", "load_embedding", "expand_prompt", "lora_kohya",
    "lora_rank_alpha", "snapshot_weights", "max_weight_diff",
    # sweeps
    "notebook_parameters", "load_sweep", "sweep_plan", "run_sweep", "score_sweep", "collect_sweep", "sweep_table",
    "plot_sweep",
    # errors
    "ConfigError", "DataError", "DiskSpaceError", "EvaluatorUnavailable", "ModelNotFound", "NotWritable",
    "OutOfMemory", "ResumeError",
]
