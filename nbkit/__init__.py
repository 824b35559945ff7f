"""nbkit: the helper package of the Stable Diffusion fine-tuning course.

Layered subpackages, each importing only the layers listed before it (tests/test_layers.py checks every import):
  root       config (TrainConfig), paths, safeio (safe, atomic files), errors (incl. out of memory), units, version
  env        where we run: runtime (GPU, bf16, precision, the model choice), colab (Colab/Kaggle, Drive, folders)
  models     parts and their loading, schedulers, SD 1.5's architecture, the offline model
  sample     generation from fixed seeds, grids, same-seed comparisons
  data       the training pictures, class images for prior preservation
  toy        the toy world, its judge, pretraining the toy model, the offline spec
  export     the take-home formats, the single file, take_home checks, the Hub
  scores     CLIP/DINO/judge evaluators, scores while training
  training   methods, optimizer, the one loop, batches, placement, checkpoints, guards, manifest, accel, launch, presets
  memory     budget, planner, activation model, memtrace, tuning a run to a GPU
  notebook   nb.setup, nb.costs, parameters (the one table of names), plots, widgets, course, sweeps
  cli        `python -m nbkit <command>`
Notebooks use the curated names below: `import nbkit as nb`, then `nb.setup(...)`, `nb.TrainConfig`, `nb.train`, ...
"""

from nbkit import data, env, export, memory, models, notebook, sample, scores, toy, training  # noqa: F401
from nbkit.config import ConfigError, TrainConfig
from nbkit.data.class_images import choose_class_images, ensure_class_images
from nbkit.data.images import DataError, load_folder, thumbnail
from nbkit.env.colab import hub_cache_on_drive, mount_drive
from nbkit.env.colab import paths as course_paths
from nbkit.errors import ExportError
from nbkit.export.formats import expand_prompt, human_size, load_embedding, lora_kohya, lora_rank_alpha, max_weight_diff
from nbkit.export.formats import snapshot as snapshot_weights
from nbkit.export.hub import prefetch
from nbkit.export.takehome import pixel_difference, take_home
from nbkit.export.takehome import push as push_take_home
from nbkit.export.takehome import report as take_home_report
from nbkit.memory.budget import budget_table, sd15_on_meta, track_peak
from nbkit.memory.budget import compare_settings as memory_budgets
from nbkit.memory.tuning import preview, tune
from nbkit.models.offline import offline_model_dir
from nbkit.models.parts import ModelNotFound, SDParts, load_parts, pipeline
from nbkit.notebook.costs import costs
from nbkit.notebook.course import NOTEBOOKS
from nbkit.notebook.course import plot_memory as plot_course_memory
from nbkit.notebook.course import table as course_table
from nbkit.notebook.inside import step_source
from nbkit.notebook.plots import image_rows, loss_curve, loss_terms, metric_curves
from nbkit.notebook.session import Setup, setup
from nbkit.notebook.sweep import collect as collect_sweep
from nbkit.notebook.sweep import load_spec as load_sweep
from nbkit.notebook.sweep import markdown as sweep_table
from nbkit.notebook.sweep import notebook_parameters
from nbkit.notebook.sweep import plan as sweep_plan
from nbkit.notebook.sweep import plot_final as plot_sweep
from nbkit.notebook.sweep import run as run_sweep
from nbkit.notebook.sweep import score as score_sweep
from nbkit.notebook.sweep_pick import SweetSpot, toy_findings
from nbkit.notebook.sweep_pick import pick as pick_sweet_spot
from nbkit.notebook.sweep_results import baseline as sweep_baseline
from nbkit.notebook.sweep_spec import toy_grid
from nbkit.notebook.widgets import photos, prompt_playground, upload_box
from nbkit.sample.compare import embedding_shift, pixel_distance, scheduler_grid, side_by_side
from nbkit.sample.noise import high_frequency_energy, reference_distance
from nbkit.sample.sampling import SCHEDULERS, generate, grid, save_images, set_scheduler, timed_generate
from nbkit.scores.evaluate import EvaluatorUnavailable
from nbkit.scores.evaluate import for_run as evaluator_for_run
from nbkit.scores.tracking import read_metrics
from nbkit.scores.tracking import table as metrics_table
from nbkit.toy.judge import format_scores
from nbkit.toy.judge import scores as judge_scores
from nbkit.training.checkpoint import ResumeError
from nbkit.training.guards import DiskSpaceError, NotWritable, OutOfMemory
from nbkit.training.launch import deepspeed_command
from nbkit.training.loop import TrainResult, train
from nbkit.training.manifest import summary as manifest_summary
from nbkit.version import __version__

__all__ = [
    # setting up a notebook
    "Setup", "setup", "costs", "NOTEBOOKS", "course_table", "plot_course_memory", "mount_drive", "course_paths",
    "hub_cache_on_drive", "prefetch", "offline_model_dir",
    # models, pictures, sampling
    "SDParts", "load_parts", "pipeline", "SCHEDULERS", "set_scheduler", "generate", "timed_generate", "grid",
    "save_images", "load_folder", "thumbnail", "photos", "upload_box", "prompt_playground",
    # training and memory
    "TrainConfig", "TrainResult", "train", "tune", "preview", "memory_budgets", "sd15_on_meta", "budget_table",
    "track_peak", "choose_class_images", "ensure_class_images", "step_source", "deepspeed_command",
    # looking at results
    "loss_curve", "loss_terms", "metric_curves", "image_rows", "side_by_side", "pixel_distance", "pixel_difference",
    "embedding_shift", "scheduler_grid", "high_frequency_energy", "reference_distance", "read_metrics", "metrics_table",
    "manifest_summary", "evaluator_for_run",
    "judge_scores", "format_scores",
    # taking it home
    "take_home", "take_home_report", "push_take_home", "human_size", "load_embedding", "expand_prompt", "lora_kohya",
    "lora_rank_alpha", "snapshot_weights", "max_weight_diff",
    # sweeps
    "notebook_parameters", "load_sweep", "sweep_plan", "run_sweep", "score_sweep", "collect_sweep", "sweep_table",
    "plot_sweep", "sweep_baseline", "pick_sweet_spot", "SweetSpot", "toy_grid", "toy_findings",
    # errors
    "ConfigError", "DataError", "DiskSpaceError", "ExportError", "EvaluatorUnavailable", "ModelNotFound", "NotWritable",
    "OutOfMemory", "ResumeError",
    "__version__",
]
