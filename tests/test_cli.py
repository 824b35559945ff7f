"""The command line: a TrainConfig from YAML/JSON/flags, and a real `accelerate launch -m nbkit train` run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from nbkit import ConfigError, cli
from nbkit.training import accel

ROOT = Path(__file__).resolve().parent.parent


def test_config_from_yaml_and_flags(tmp_path, instance_dir):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"instance_dir": str(instance_dir), "max_train_steps": 7, "preset": "16gb",
                                 "validation_prompts": ["a star"]}))
    args = cli._parser().parse_args(["train", "--config", str(f), "--max_train_steps", "3",
                                     "--train_text_encoder", "true", "--learning_rate", "1e-5", "--identifier", "zwx"])
    cfg, preset, given = cli.build_config(args)
    assert cfg.max_train_steps == 3 and cfg.train_text_encoder is True and cfg.learning_rate == 1e-5
    assert cfg.validation_prompts == ["a star"] and cfg.identifier == "zwx" and preset == "16gb"
    assert {"instance_dir", "max_train_steps", "train_text_encoder"} <= given
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"max_train_steps": 5}))
    cfg, preset, _ = cli.build_config(cli._parser().parse_args(["plan", "--config", str(j)]))
    assert cfg.max_train_steps == 5 and preset == "auto"


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


def test_values_are_typed_by_the_field():
    assert cli.coerce("learning_rate", "1e-6") == 1e-6  # YAML 1.1 reads 1e-6 as text
    assert cli.coerce("max_train_steps", 400.0) == 400 and cli.coerce("text_encoder_steps", None) is None
    assert cli.coerce("train_text_encoder", "false") is False and cli.coerce("validation_prompts", "a b") == ["a b"]
    assert cli.coerce("noise_offset", "1e-1") == 0.1 and cli.coerce("snr_gamma", "auto") == "auto"
    with pytest.raises(ConfigError, match="max_train_steps='many': expected int"):
        cli.coerce("max_train_steps", "many")



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
