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
as a flag (`--max_train_steps 800 --train_text_encoder`), flags winning over the file. Settings given
explicitly are kept; the preset ("auto": from the GPU) fills in the memory settings that were not given.
diffusers' train_dreambooth.py command lines run as they are (`python -m nbkit train
--pretrained_model_name_or_path ... --instance_data_dir ... --instance_prompt "a photo of sks dog" ...`): see
DIFFUSERS_FLAGS for what each of its flags becomes.
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


# diffusers' examples/dreambooth/train_dreambooth.py flags, one row each, so that its README's command lines run here.
# Its flags named as a TrainConfig field (instance_prompt, class_prompt, with_prior_preservation, prior_loss_weight,
# num_class_images, output_dir, seed, resolution, center_crop, train_text_encoder, train_batch_size, max_train_steps,
# checkpointing_steps, checkpoints_total_limit, gradient_accumulation_steps, gradient_checkpointing, learning_rate,
# lr_scheduler, lr_warmup_steps, use_8bit_adam, adam_beta1/2, adam_weight_decay, adam_epsilon, max_grad_norm,
# report_to, logging_dir, validation_steps, num_validation_images, mixed_precision, snr_gamma) are that field.
# ("alias", field): another name of the field; ("const", field, value): a bare flag setting the field to value;
# ("ignore", why): accepted, with a one-line warning; ("refuse", why): an error saying what to do instead.
NO_UPLOAD = "nbkit uploads nothing (there is no hub here); the model is in output_dir/model"
NOT_SD = "it is for image-conditioned models (DeepFloyd IF), which nbkit does not train"
DIFFUSERS_FLAGS: dict[str, tuple] = {
    "pretrained_model_name_or_path": ("alias", "model"),
    "instance_data_dir": ("alias", "instance_dir"),
    "class_data_dir": ("alias", "class_dir"),
    "sample_batch_size": ("alias", "class_batch_size"),
    "resume_from_checkpoint": ("alias", "resume"),  # "latest" = "auto"; a checkpoint folder = that one
    "validation_prompt": ("alias", "validation_prompts"),
    "offset_noise": ("const", "noise_offset", 0.1),  # diffusers' fixed offset of 0.1
    "num_train_epochs": ("ignore", "nbkit counts optimizer steps: --max_train_steps sets the length"),
    "dataloader_num_workers": ("ignore", "nbkit encodes the pictures once (cached latents), no loader workers"),
    "enable_xformers_memory_efficient_attention": ("ignore", "nbkit uses PyTorch's scaled-dot-product attention "
                                                   "(flash / memory-efficient kernels)"),
    "set_grads_to_none": ("ignore", "nbkit always frees gradients (zero_grad(set_to_none=True))"),
    "pre_compute_text_embeddings": ("ignore", "nbkit precomputes the prompt embeddings when the text encoder is "
                                    "frozen"),
    "allow_tf32": ("ignore", "nbkit leaves TF32 at PyTorch's default; mixed_precision picks fp16/bf16"),
    "prior_generation_precision": ("ignore", "nbkit makes class images in fp16 on a GPU, fp32 on a CPU"),
    "skip_save_text_encoder": ("ignore", "nbkit saves the whole pipeline, so it loads with from_pretrained"),
    "lr_num_cycles": ("ignore", "nbkit uses get_scheduler's default (1 cycle)"),
    "lr_power": ("ignore", "nbkit uses get_scheduler's default (power 1.0)"),
    "local_rank": ("ignore", "accelerate launch sets the ranks"),
    "push_to_hub": ("ignore", NO_UPLOAD),
    "hub_token": ("ignore", NO_UPLOAD),
    "hub_model_id": ("ignore", NO_UPLOAD),
    "scale_lr": ("refuse", "nbkit does not scale the learning rate: give --learning_rate the value to use (diffusers "
                 "multiplies it by train_batch_size x gradient_accumulation_steps x GPUs)"),
    "revision": ("refuse", "nbkit loads a model's main revision: save the one you want to a folder and give that "
                 "folder as --pretrained_model_name_or_path"),
    "variant": ("refuse", "nbkit loads the full-precision weights and casts them itself: drop --variant"),
    "tokenizer_name": ("refuse", "nbkit uses the model's own tokenizer: drop --tokenizer_name"),
    "tokenizer_max_length": ("refuse", "nbkit pads prompts to the tokenizer's length (77): drop it"),
    "text_encoder_use_attention_mask": ("refuse", "nbkit encodes prompts as SD 1.x does, without a mask: drop it"),
    "validation_scheduler": ("refuse", "use --sample_scheduler with nbkit's names (DPMSolverMultistepScheduler is "
                             "dpmpp_2m)"),
    "validation_images": ("refuse", NOT_SD),
    "class_labels_conditioning": ("refuse", NOT_SD),
}
TRAIN_EPILOG = """Every TrainConfig field is a flag; booleans alone mean true (--train_text_encoder), or take a value
(--train_text_encoder false). diffusers' train_dreambooth.py flags work too (--pretrained_model_name_or_path,
--instance_data_dir, --class_data_dir, --resume_from_checkpoint latest, ...): the ones nbkit has no equivalent for
are ignored with a warning or refused with what to do. Flags not given take nbkit's defaults, not diffusers': a run
resumes from output_dir's latest checkpoint unless --resume never. --config files hold the same fields by name."""


def _union_type(kinds: tuple):
    """The argparse type of a union field: each kind tried in turn; 'none'/'null' is None where the field allows it."""
    def convert(text: str):
        if type(None) in kinds and text.lower() in ("none", "null"):
            return None
        for kind in (k for k in kinds if k not in (str, type(None))):
            try:
                return kind(text)
            except ValueError:
                pass
        if str in kinds:
            return text
        raise ValueError(text)

    convert.__name__ = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)  # argparse's message
    return convert


def flags_dataclass() -> type:
    """TrainConfig as HfArgumentParser wants it: each field's comment as its help, diffusers' names as aliases."""
    import types
    import typing

    hints, helps = typing.get_type_hints(TrainConfig), TrainConfig.field_help()
    aliases: dict[str, list[str]] = {}
    for flag, (kind, *rest) in DIFFUSERS_FLAGS.items():
        if kind == "alias":
            aliases.setdefault(rest[0], []).append(f"--{flag}")
    rows = []
    for f in dataclasses.fields(TrainConfig):
        kind = str if f.name == "concepts_list" else hints[f.name]  # on the command line: a JSON file (or text)
        if isinstance(kind, types.UnionType):  # HfArgumentParser takes "float | str" as float
            kind = _union_type(typing.get_args(kind))
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {
            "default_factory": f.default_factory}  # a list: HfArgumentParser needs default= for the --no_X flags
        shown = default.get("default", f.default_factory() if "default_factory" in default else None)
        meta = {"help": f"{helps.get(f.name) or f.name} (default: {shown!r})".replace("%", "%%"),
                "aliases": aliases.get(f.name, [])}
        rows.append((f.name, kind, dataclasses.field(**default, metadata=meta)))
    return dataclasses.make_dataclass("TrainFlags", rows)


def _parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    ap = argparse.ArgumentParser(prog="python -m nbkit", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    flags = flags_dataclass()
    for name, helptext in (("train", "fine-tune"), ("plan", "predict the peak GPU memory and exit")):
        p = sub.add_parser(name, dataclass_types=[flags], help=helptext, allow_abbrev=False, epilog=TRAIN_EPILOG,
                           usage=f"python -m nbkit {name} [--config FILE] [--preset NAME] [--FIELD VALUE ...]")
        for action in p._actions:  # what was not given stays out of the namespace: the preset fills those in
            if action.dest in FIELDS:
                action.default = argparse.SUPPRESS
        p.add_argument("--config", default=argparse.SUPPRESS, help="YAML/JSON file of TrainConfig fields")
        p.add_argument("--preset", default=argparse.SUPPRESS,
                       help="'auto' (default: from the GPU) or a preset name (python -m nbkit presets)")
        if name == "plan":
            p.add_argument("--gpu-gb", type=float, default=argparse.SUPPRESS,
                           help="plan for a GPU of this many GiB (default: the one here)")
            p.add_argument("--bf16", action="store_true", default=argparse.SUPPRESS,
                           help="with --gpu-gb: the GPU computes in bf16")
        group = p.add_argument_group("diffusers train_dreambooth.py flags nbkit has no equivalent for")
        for flag, (kind, *rest) in DIFFUSERS_FLAGS.items():
            if kind == "const":
                p.add_argument(f"--{flag}", dest=rest[0], action="store_const", const=rest[1],
                               default=argparse.SUPPRESS, help=f"= --{rest[0]} {rest[1]}")
            elif kind in ("ignore", "refuse"):
                group.add_argument(f"--{flag}", dest=f"diffusers_{flag}", nargs="*", default=argparse.SUPPRESS,
                                   metavar="VALUE", help=f"{'ignored' if kind == 'ignore' else 'refused'}: {rest[0]}")
    sub.add_parser("presets", help="list the memory presets")
    ap.commands = sub.choices
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


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line as a namespace of what was given; an unknown flag is an error naming the closest one."""
    import difflib

    ap = _parser()
    args, rest = ap.parse_known_args(argv)
    if rest:
        known = [o for a in ap.commands[args.command]._actions for o in a.option_strings]
        word = next((r for r in rest if r.startswith("-")), rest[0]).split("=")[0]
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"python -m nbkit {args.command}: unknown {'flag' if word[:1] == '-' else 'argument'} "
                          f"{word!r}{hint} (python -m nbkit {args.command} --help lists them all)")
    return args


def _typed(name: str, value, actions: dict):
    """A config file's value as the flag's type (YAML reads 1e-6 as text): the parser's own conversion."""
    action = actions[name]
    if value is None or action.type is None:
        return value
    try:
        if action.nargs == "+":
            values = value if isinstance(value, list) else [value]
            return [action.type(v) if isinstance(v, str) else v for v in values]
        return action.type(value) if isinstance(value, str) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {getattr(action.type, '__name__', 'another kind of value')}.") \
            from None


def _diffusers_flags(args: argparse.Namespace, given: dict) -> None:
    """Warn about diffusers' flags nbkit ignores, refuse the ones it cannot honour, and name the identifier."""
    used = [k.removeprefix("diffusers_") for k in vars(args) if k.startswith("diffusers_")]
    refused = [f"--{f}: {DIFFUSERS_FLAGS[f][1]}." for f in used if DIFFUSERS_FLAGS[f][0] == "refuse"]
    if refused:
        raise ConfigError("These diffusers flags have no nbkit equivalent:\n  - " + "\n  - ".join(refused))
    say = int(os.environ.get("RANK", "0")) == 0  # once, not by every process
    for flag in (used if say else ()):
        print(f"warning: --{flag} ignored: {DIFFUSERS_FLAGS[flag][1]}.", file=sys.stderr)
    if given.get("resume") == "latest":  # diffusers' word for the latest checkpoint
        given["resume"] = "auto"
    words = str(given.get("instance_prompt", "")).split()
    if (words and "identifier" not in given and TrainConfig.identifier not in words
            and given.get("method") != "textual_inversion"):
        # diffusers has no identifier setting: the word the class prompt lacks, else the one before the class noun
        extra = [w for w in words if w not in str(given.get("class_prompt", "")).split()]
        given["identifier"] = extra[0] if len(extra) == 1 else words[-2 if len(words) > 1 else 0]
        if say:
            print(f"identifier {given['identifier']!r} (the word of the instance prompt that names the subject; "
                  "--identifier chooses another)")


def build_config(args: argparse.Namespace) -> tuple[TrainConfig, str, set[str]]:
    """(config, preset name, the fields given explicitly) from --config and the flags."""
    given = read_config_file(args.config) if getattr(args, "config", None) else {}
    preset = str(given.pop("preset", "auto"))
    if given:
        p = _parser().commands[args.command]
        actions = {a.dest: a for a in p._actions if a.dest in FIELDS and a.option_strings[0] == f"--{a.dest}"}
        given = {k: _typed(k, v, actions) for k, v in given.items()}
    given.update({k: v for k, v in vars(args).items() if k in FIELDS})
    _diffusers_flags(args, given)
    preset = getattr(args, "preset", preset)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not given.get("deepspeed_config"):
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if ds_file:  # launched with a DeepSpeed accelerate config: the loop must know
            given["deepspeed_config"] = ds_file
    return TrainConfig(**given), preset, set(given)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:  # python -m nbkit sweep ... = python -m nbkit sweep ... (its own parser)
        return delegate(argv[0], argv[1:])
    args = parse(argv)
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
