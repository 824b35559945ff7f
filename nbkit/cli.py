"""Command line: the notebooks' training run from a shell, on one GPU, several (`accelerate launch`), or DeepSpeed.

    python -m nbkit train --config run.yaml                       # this machine's GPU (or CPU)
    accelerate launch -m nbkit train --config run.yaml            # every GPU accelerate is configured for
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m nbkit train --config run.yaml
    accelerate launch --config_file configs/accelerate/deepspeed_zero2_offload.yaml \\
        -m nbkit train --config run.yaml --preset 8gb-deepspeed
    python -m nbkit plan --config run.yaml --gpu-gb 15            # predicted peak memory on a 16 GB card
    python -m nbkit presets                                       # what each preset sets
    python -m nbkit calibrate --spec sd15                         # re-measure the planner's activation model
    python -m nbkit sweep configs/sweeps/toy_lr_steps.yaml        # a notebook over a grid (see nbkit.notebook.sweep)
    python -m nbkit class-images --prompt "a photo of a dog" --out shared/class_images/dog   # prior preservation
    python -m nbkit pretrain --quick                              # (re)pretrain the toy model (nbkit.toy.pretrain)
    python -m nbkit judge                                         # retrain the toy judge (nbkit.toy.judge)
    python -m nbkit offline                                       # remake the offline spec (nbkit.toy.spec)
    python -m nbkit tiny-sdxl                                     # remake the tiny SDXL (nbkit.toy.tiny_sdxl)

`python -m nbkit <command> --help` shows each command's own options. Each module also runs on its own
(`python -m nbkit.toy.pretrain`, `python -m nbkit.notebook.sweep`, ...), and `python tools/class_images.py` still works.

The config file (YAML or JSON) holds TrainConfig fields (and optionally `preset`); any field can also be given
as a flag (`--max_train_steps 800 --train_text_encoder true`), flags winning over the file. Settings given
explicitly are kept; the preset ("auto": from the GPU) fills in the memory settings that were not given.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path

from nbkit.config import ConfigError, TrainConfig

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Commands with their own argument parser: `python -m nbkit NAME ARGS...` calls module.function(ARGS...), so that
# `python -m nbkit NAME --help` is that parser's help. calibrate's parser expects the word "calibrate" itself.
DELEGATED = {
    "calibrate": ("nbkit.memory.planner", "_main", True, "re-measure the planner's activation model"),
    "sweep": ("nbkit.notebook.sweep", "main", False, "run a notebook over a grid of parameters (resumable)"),
    "class-images": ("nbkit.cli", "class_images", False, "make a class prompt's prior-preservation images"),
    "pretrain": ("nbkit.toy.pretrain", "main", False, "pretrain the toy model (writes data/toy-sd/)"),
    "judge": ("nbkit.toy.judge", "main", False, "train the toy judge again (writes data/judge/)"),
    "offline": ("nbkit.toy.spec", "main", False, "remake the offline spec and the sample pictures"),
    "tiny-sdxl": ("nbkit.toy.tiny_sdxl", "main", False, "remake the tiny SDXL (writes data/tiny-sdxl/)"),
}


def read_config_file(path: str | Path) -> dict:
    """TrainConfig fields (plus an optional 'preset') from a YAML or JSON file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {str(p)!r} does not exist.")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings (name: value), got {type(data).__name__}.")
    unknown = sorted(set(data) - set(FIELDS) - {"preset"})
    if unknown:
        raise ConfigError(f"{p}: unknown settings {unknown}. Valid ones are TrainConfig's fields: "
                          f"{', '.join(FIELDS)} (and 'preset').")
    return data


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbkit", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, helptext in (("train", "fine-tune"), ("plan", "predict the peak GPU memory and exit")):
        p = sub.add_parser(name, help=helptext, argument_default=argparse.SUPPRESS)
        p.add_argument("--config", help="YAML/JSON file of TrainConfig fields")
        p.add_argument("--preset", help="'auto' (default: from the GPU) or a preset name (python -m nbkit presets)")
        if name == "plan":
            p.add_argument("--gpu-gb", type=float, help="plan for a GPU of this many GiB (default: the one here)")
            p.add_argument("--bf16", action="store_true", help="with --gpu-gb: the GPU computes in bf16")
        for f in FIELDS.values():
            p.add_argument(f"--{f.name}", dest=f"field_{f.name}", metavar="VALUE", help=f"TrainConfig.{f.name}")
    sub.add_parser("presets", help="list the memory presets")
    for name, (_, _, _, helptext) in DELEGATED.items():
        sub.add_parser(name, help=helptext)  # its options: python -m nbkit NAME --help
    return ap


CLASS_IMAGES_EXAMPLES = """Already present images are kept (an interrupted run resumes); a folder made for another
prompt is refused. One folder per class prompt:

    python -m nbkit class-images --prompt "a photo of a dog" --out shared/class_images/dog --count 200
    python -m nbkit class-images --model offline --prompt "a photo of a star" --out shared/class_images/star
"""


def delegate(name: str, argv: list[str]) -> int:
    """`python -m nbkit NAME ARGS...`: the command's own entry function with the rest of the command line."""
    module, function, keep_name, _ = DELEGATED[name]
    rc = getattr(importlib.import_module(module), function)([name, *argv] if keep_name else argv)
    return 0 if rc is None else int(rc)


def class_images(argv: list[str] | None = None) -> int:
    """`python -m nbkit class-images`: make the class images of prior preservation once, for a whole class.

    Every student then points class_dir at the same folder: nobody waits for generation, and the folder is reused
    by every notebook and run. Already present images are kept (an interrupted run resumes); a folder made for
    another prompt is refused. One folder per class prompt (nbkit.data.class_images.ensure_class_images; fp16 on a GPU).
    """
    ap = argparse.ArgumentParser(prog="python -m nbkit class-images", description=class_images.__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CLASS_IMAGES_EXAMPLES)
    ap.add_argument("--prompt", required=True, help='the class, without the identifier, e.g. "a photo of a dog"')
    ap.add_argument("--out", required=True, help="folder for the images (shared by the whole class)")
    ap.add_argument("--model", default="auto", help='"auto" (SD 1.5 on a GPU with the hub), a hub id, a folder, '
                    'or "offline"')
    ap.add_argument("--count", type=int, default=200, help="images to have in the folder (the course uses ~200)")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default: 512, or 64 offline)")
    ap.add_argument("--steps", type=int, default=50, help="inference steps per image")
    ap.add_argument("--batch-size", type=int, default=4, help="images per batch (lower it if the GPU runs out)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (image i uses seed*10000 + i)")
    a = ap.parse_args(argv)

    import torch

    from nbkit.data.class_images import ensure_class_images
    from nbkit.env import runtime
    from nbkit.models import offline
    from nbkit.models.parts import load_parts

    rt = runtime.detect()
    model, why = runtime.choose_model(a.model, rt)
    print(rt.describe())
    print(why)
    parts = load_parts(model)
    small = parts.source == str(offline.offline_model_dir())
    resolution = a.resolution or (offline.OFFLINE_RESOLUTION if small else 512)
    dtype = torch.float16 if rt.device == "cuda" else torch.float32
    t = time.perf_counter()
    paths = ensure_class_images(parts, a.prompt, a.out, a.count, resolution, seed=a.seed, batch_size=a.batch_size,
                                steps=a.steps, device=rt.device, dtype=dtype)
    print(f"{len(paths)} class images for {a.prompt!r} in {a.out} ({time.perf_counter() - t:.0f} s). "
          f"Point class_dir at this folder (with class_prompt {a.prompt!r}) in every run.")
    return 0


def _value(name: str, raw: str):
    """A flag's text as a value (YAML rules: true/false, numbers, [lists], null); coerce() types it."""
    import yaml

    if FIELDS[name].type in ("str", str):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--{name} {raw!r}: {err}") from err


def coerce(name: str, value):
    """`value` as TrainConfig.<name>'s type, or a ConfigError saying what was expected (YAML reads 1e-6 as text)."""
    kind = str(FIELDS[name].type).replace(" ", "")
    if value is None and "None" in kind:
        return None
    base = kind.replace("|None", "")
    try:
        if base == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "float":
            return float(value)
        if base == "float|str":  # a number, or a word such as "auto"
            try:
                return float(value)
            except (TypeError, ValueError):
                return str(value)
        if base == "str":
            return str(value)
        if base.startswith("list"):
            return [str(v) for v in (value if isinstance(value, list) else [value])]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {kind.replace('|', ' or ')}.") from None
    return value


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, str, set[str]]:
    """(config, preset name, the fields given explicitly) from --config and the flags."""
    given = read_config_file(args.config) if getattr(args, "config", None) else {}
    preset = str(given.pop("preset", "auto"))
    for key, raw in vars(args).items():
        if key.startswith("field_"):
            given[key[6:]] = _value(key[6:], raw)
    preset = getattr(args, "preset", preset)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not given.get("deepspeed_config"):
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if ds_file:  # launched with a DeepSpeed accelerate config: the loop must know
            given["deepspeed_config"] = ds_file
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in given.items()})
    return cfg, preset, set(given)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:  # python -m nbkit sweep ... = python -m nbkit sweep ... (its own parser)
        return delegate(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    from nbkit.memory import tuning

    if args.command == "presets":
        print(tuning.describe())
        return 0
    from nbkit.env import runtime
    from nbkit.training.accel import world_size

    cfg, preset, given = build_config(args)
    rt = runtime.detect()
    if args.command == "plan" and getattr(args, "gpu_gb", None):
        rt = runtime.Runtime("local", "cuda", f"{args.gpu_gb:g} GiB GPU", 1, args.gpu_gb,
                             bool(getattr(args, "bf16", False)))
    main_process = int(os.environ.get("RANK", "0")) == 0
    tuned = tuning.tune(cfg, preset, rt, num_processes=world_size(), keep=given)
    if main_process:
        print(rt.describe())
        print(tuned)
        print(tuned.plan)
    if args.command == "plan":
        return 0 if tuned.plan.fits else 1
    tuned.config.validate()
    from nbkit.training.loop import train

    result = train(tuned.config, progress=main_process)
    if main_process:
        peak = result.info.get("cuda_peak_allocated_gib")
        print(f"saved {result.saved} ({len(result.losses)} steps, final loss {result.losses[-1]:.4f}, "
              f"{result.seconds:.0f} s" + (f", peak GPU memory allocated {peak:.2f} GiB" if peak else "") + ")")
    return 0


def entry() -> None:
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
