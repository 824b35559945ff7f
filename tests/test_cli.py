"""The command line: a TrainConfig from YAML/JSON/flags, and a real `accelerate launch -m nbkit train` run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from nbkit import ConfigError, TrainConfig, cli
from nbkit.training import accel

ROOT = Path(__file__).resolve().parent.parent


def test_config_from_yaml_and_flags(tmp_path, instance_dir):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"instance_dir": str(instance_dir), "max_train_steps": 7, "preset": "16gb",
                                 "validation_prompts": ["a star"]}))
    args = cli.parse(["train", "--config", str(f), "--max_train_steps", "3", "--train_text_encoder",
                      "--learning_rate", "1e-5", "--identifier", "zwx"])
    cfg, preset, given = cli.build_config(args)
    assert cfg.max_train_steps == 3 and cfg.train_text_encoder is True and cfg.learning_rate == 1e-5
    assert cfg.validation_prompts == ["a star"] and cfg.identifier == "zwx" and preset == "16gb"
    assert {"instance_dir", "max_train_steps", "train_text_encoder"} <= given
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"max_train_steps": 5}))
    cfg, preset, _ = cli.build_config(cli.parse(["plan", "--config", str(j)]))
    assert cfg.max_train_steps == 5 and preset == "auto"
    c = TrainConfig(instance_dir="x", validation_prompts=["a b"], lora_alpha=8.0, noise_offset=0.1, resume=None)
    j.write_text(json.dumps(c.to_dict()))  # nbkit.training.launch's file: every field, None and lists included
    assert cli.build_config(cli.parse(["train", "--config", str(j)]))[0] == c


def test_bad_config_file_names_the_problem(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("max_steps: 3\n")
    with pytest.raises(ConfigError, match="unknown settings \\['max_steps'\\]"):
        cli.read_config_file(f)
    with pytest.raises(ConfigError, match="does not exist"):
        cli.read_config_file(tmp_path / "missing.yaml")


def test_effective_batch_counts_processes_and_accumulation(cfg):
    n, text = accel.effective_batch(cfg.replace(train_batch_size=2, gradient_accumulation_steps=3), 2)
    assert n == 12 and "2 per step x 3 accumulation x 2 processes" in text


def test_plan_command(capsys):
    assert cli.main(["plan", "--model", "sd15", "--gpu-gb", "14.75", "--train_text_encoder", "true"]) == 0
    out = capsys.readouterr().out
    assert "preset '16gb'" in out and "peak allocated (predicted)" in out and "fits" in out


def test_accelerate_launch_trains_on_cpu_in_a_real_subprocess(tmp_path, instance_dir):
    run = tmp_path / "run.yaml"
    out = tmp_path / "out"
    run.write_text(yaml.safe_dump({"instance_dir": str(instance_dir), "output_dir": str(out), "resolution": 64,
                                   "learning_rate": 1e-3, "validation_steps": 0, "max_train_steps": 5}))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nbkit", "train", "--config", str(run),
           "--max_train_steps", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "effective batch 1 = 1 per step x 1 accumulation x 1 process" in p.stdout
    assert "preset 'cpu'" in p.stdout
    log = json.loads((out / "losses.json").read_text())
    assert len(log) == 2  # the flag won over the file
    sd = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert sd and all(v.isfinite().all() for v in sd.values())


def test_values_are_typed_by_the_field(tmp_path):
    args = cli.parse(["plan", "--learning_rate", "1e-6", "--max_train_steps", "400", "--text_encoder_steps", "none",
                      "--lora_alpha", "8", "--noise_offset", "1e-1", "--snr_gamma", "auto", "--resume", "None",
                      "--validation_prompts", "a b", "c"])
    cfg, _, _ = cli.build_config(args)
    assert cfg.learning_rate == 1e-6 and cfg.max_train_steps == 400 and cfg.text_encoder_steps is None
    assert cfg.lora_alpha == 8.0 and cfg.noise_offset == 0.1 and cfg.snr_gamma == "auto" and cfg.resume is None
    assert cfg.validation_prompts == ["a b", "c"]
    f = tmp_path / "run.yaml"  # YAML 1.1 reads 1e-6 as text: the file's values go through the flags' types
    f.write_text("learning_rate: 1e-6\nnoise_offset: '0.05'\ntext_encoder_steps: null\nvalidation_prompts: a star\n")
    cfg, _, _ = cli.build_config(cli.parse(["plan", "--config", str(f)]))
    assert cfg.learning_rate == 1e-6 and cfg.noise_offset == 0.05 and cfg.validation_prompts == ["a star"]
    f.write_text("max_train_steps: many\n")
    with pytest.raises(ConfigError, match="max_train_steps='many': expected int"):
        cli.build_config(cli.parse(["plan", "--config", str(f)]))
    with pytest.raises(SystemExit):  # argparse: "argument --max_train_steps: invalid int value: 'many'"
        cli.parse(["plan", "--max_train_steps", "many"])


def test_bare_booleans_and_values():
    cfg, _, given = cli.build_config(cli.parse(["plan", "--train_text_encoder", "--with_prior_preservation",
                                                "--center_crop", "false", "--use_8bit_adam", "true"]))
    assert cfg.train_text_encoder and cfg.with_prior_preservation and cfg.use_8bit_adam and not cfg.center_crop
    assert given == {"train_text_encoder", "with_prior_preservation", "center_crop", "use_8bit_adam"}
    cfg, _, _ = cli.build_config(cli.parse(["plan", "--no_cache_latents", "--gradient_checkpointing"]))
    assert cfg.cache_latents is False and cfg.gradient_checkpointing is True


def test_help_is_each_fields_comment(capsys):
    helps = TrainConfig.field_help()
    assert set(helps) == set(cli.FIELDS) and all(helps.values()), [k for k, v in helps.items() if not v]
    assert helps["noise_offset"].startswith("offset noise")  # a comment on the line above its field
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and "TrainConfig." not in out
    for name in ("train_text_encoder", "noise_offset", "resume", "gradient_checkpointing"):
        assert " ".join(helps[name].split()) in out, name
    assert "--model MODEL, --pretrained_model_name_or_path MODEL" in out and "(default: 400)" in out


def test_unknown_flag_names_the_closest():
    with pytest.raises(ConfigError, match="unknown flag '--max_steps'; did you mean --max_train_steps"):
        cli.parse(["train", "--max_steps", "3"])
    with pytest.raises(ConfigError, match="unknown flag '--instance_data'; did you mean --instance_data_dir"):
        cli.parse(["train", "--instance_data=x"])


# Every flag of diffusers' examples/dreambooth/train_dreambooth.py (its parse_args, 2025)
TRAIN_DREAMBOOTH_FLAGS = """pretrained_model_name_or_path revision variant tokenizer_name instance_data_dir
class_data_dir instance_prompt class_prompt with_prior_preservation prior_loss_weight num_class_images output_dir seed
resolution
center_crop train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate scale_lr
lr_scheduler lr_warmup_steps lr_num_cycles lr_power use_8bit_adam dataloader_num_workers adam_beta1 adam_beta2
adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to
validation_prompt num_validation_images validation_steps mixed_precision prior_generation_precision local_rank
enable_xformers_memory_efficient_attention set_grads_to_none offset_noise snr_gamma pre_compute_text_embeddings
tokenizer_max_length text_encoder_use_attention_mask skip_save_text_encoder validation_images class_labels_conditioning
validation_scheduler""".split()


def test_every_diffusers_flag_is_mapped_ignored_or_refused(capsys):
    assert not [f for f in TRAIN_DREAMBOOTH_FLAGS if f not in cli.FIELDS and f not in cli.DIFFUSERS_FLAGS]
    cfg, _, given = cli.build_config(cli.parse([
        "plan", "--pretrained_model_name_or_path", "sd15", "--instance_data_dir", "d", "--class_data_dir", "c",
        "--sample_batch_size", "2", "--resume_from_checkpoint", "latest", "--validation_prompt", "a photo of sks dog",
        "--offset_noise", "--instance_prompt", "a photo of sks dog", "--report_to", "tensorboard", "--logging_dir",
        "logs", "--enable_xformers_memory_efficient_attention", "--dataloader_num_workers", "4", "--push_to_hub"]))
    assert (cfg.model, cfg.instance_dir, cfg.class_dir) == ("sd15", "d", "c")
    assert cfg.class_batch_size == 2 and cfg.resume == "auto"
    assert cfg.validation_prompts == ["a photo of sks dog"] and cfg.noise_offset == 0.1 and cfg.identifier == "sks"
    assert (cfg.report_to, cfg.logging_dir) == ("tensorboard", "logs") and "identifier" in given
    err = capsys.readouterr().err
    for flag in ("enable_xformers_memory_efficient_attention", "dataloader_num_workers", "push_to_hub"):
        assert f"warning: --{flag} ignored: nbkit" in err
    with pytest.raises(ConfigError, match="--scale_lr: nbkit does not scale.*\n  - --revision: nbkit loads"):
        cli.build_config(cli.parse(["plan", "--scale_lr", "--revision", "fp16"]))
    cfg, _, _ = cli.build_config(cli.parse(["plan", "--instance_prompt", "a photo of sks dog in a bucket",
                                            "--class_prompt", "a photo of dog in a bucket"]))
    assert cfg.identifier == "sks"  # the word the class prompt lacks
    with pytest.raises(ConfigError, match="report_to='tensorbored'"):
        cli.build_config(cli.parse(["plan", "--report_to", "tensorbored"]))[0].validate(check_paths=False)


def _trained_pipeline(out: Path):
    from diffusers import StableDiffusionPipeline

    from nbkit.models.offline import offline_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    base = load_file(offline_model_dir() / "unet" / "diffusion_pytorch_model.safetensors")
    sd = pipe.unet.state_dict()
    assert all(v.isfinite().all() for v in sd.values())
    assert any(not sd[k].equal(base[k]) for k in base), "the UNet did not change"
    assert len(json.loads((out / "losses.json").read_text())) == 2
    return pipe


def test_diffusers_readme_command_runs(tmp_path, instance_dir, offline_dir):
    """diffusers' DreamBooth README command line, `accelerate launch train_dreambooth.py` -> `python -m nbkit train`."""
    out = tmp_path / "out"
    p = _nbkit("-m", "nbkit", "train", f"--pretrained_model_name_or_path={offline_dir}",
               f"--instance_data_dir={instance_dir}", f"--output_dir={out}", "--instance_prompt=a photo of sks dog",
               "--resolution=64", "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5e-6",
               "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=2", "--push_to_hub",
               cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "identifier 'sks'" in p.stdout and "warning: --push_to_hub ignored" in p.stderr
    _trained_pipeline(out)


def test_diffusers_prior_preservation_command_runs(tmp_path, instance_dir, offline_dir):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    assert cli.main(["train", f"--pretrained_model_name_or_path={offline_dir}", f"--instance_data_dir={instance_dir}",
                     f"--class_data_dir={class_dir}", f"--output_dir={out}", "--with_prior_preservation",
                     "--prior_loss_weight=1.0", "--instance_prompt=a photo of sks dog", "--class_prompt=a photo of dog",
                     "--resolution=64", "--train_batch_size=1", "--train_text_encoder", "--learning_rate=5e-6",
                     "--lr_scheduler=constant", "--lr_warmup_steps=0", "--num_class_images=2", "--sample_batch_size=2",
                     "--max_train_steps=2", "--validation_steps=0", "--resume_from_checkpoint", "latest"]) == 0
    assert sorted(f.name for f in class_dir.glob("*.png")) == ["class_00000.png", "class_00001.png"]
    pipe = _trained_pipeline(out)
    from nbkit.models.offline import offline_model_dir

    base = load_file(offline_model_dir() / "text_encoder" / "model.safetensors")
    assert any(not v.equal(base[k]) for k, v in pipe.text_encoder.state_dict().items() if k in base)


NEW_COMMANDS = ("pretrain", "judge", "offline", "class-images", "tiny-sdxl")


def _nbkit(*args: str, cwd=ROOT, timeout=120) -> subprocess.CompletedProcess:
    """`python -m nbkit.X ...` / `python -m nbkit ...` in a subprocess, on this checkout's nbkit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout,
                          check=False)


def test_top_level_help_lists_every_command_on_one_line():
    p = _nbkit("-m", "nbkit", "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    for name in ("train", "plan", "presets", "calibrate", "sweep", *NEW_COMMANDS):
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line and len(line.split()) > 1, f"{name!r} has no one-line help in:\n{p.stdout}"
    assert set(cli.DELEGATED) | {"train", "plan", "presets"} == {"train", "plan", "presets", "calibrate", "sweep",
                                                                 *NEW_COMMANDS}


@pytest.mark.parametrize("name", NEW_COMMANDS)
def test_new_command_help_is_the_modules_own(name):
    p = _nbkit("-m", "nbkit", name, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    usage = p.stdout.splitlines()[0]
    assert usage.startswith("usage: python -m nbkit") and name.replace("-", "_") in usage.replace("-", "_"), usage
    option = {"pretrain": "--quick", "judge": "--steps", "offline": "offline model's spec",
              "class-images": "--prompt", "tiny-sdxl": "--out"}[name]
    assert option in p.stdout


def test_old_entry_points_still_work():
    p = _nbkit("-m", "nbkit.toy.pretrain", "--help")
    assert p.returncode == 0 and "--quick" in p.stdout, p.stderr[-2000:]
    p = _nbkit(str(ROOT / "tools" / "class_images.py"), "--help")
    assert p.returncode == 0 and "--prompt" in p.stdout and "class-images" in p.stdout, p.stderr[-2000:]


def test_class_images_through_the_one_cli(tmp_path, offline_dir):
    out = tmp_path / "class"
    p = _nbkit("-m", "nbkit", "class-images", "--model", "offline", "--prompt", "a photo of a star", "--out", str(out),
               "--count", "1", "--steps", "2", "--batch-size", "1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 class images for 'a photo of a star'" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == [".nbkit_class.json", "class_00000.png"]
    assert json.loads((out / ".nbkit_class.json").read_text())["prompt"] == "a photo of a star"
    from PIL import Image

    assert Image.open(out / "class_00000.png").size == (64, 64)
