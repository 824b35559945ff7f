"""Runs that cannot go well stop early and clearly: folders, disk, out of memory, non-finite loss."""

import gc
import json
import os
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from nbkit import generate, pipeline, train
from nbkit.training import guards, optim
from nbkit.training.checkpoint import Checkpoints


def test_output_folder_with_a_file_in_the_way(cfg, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    c = cfg.replace(output_dir=str(tmp_path / "taken" / "run"), model=str(tmp_path / "no-model"))
    with pytest.raises(guards.NotWritable) as e:
        train(c)  # fails before the (missing) model is even looked at
    assert "output_dir" in str(e.value) and "not writable" in str(e.value) and "Choose a folder you can" in str(e.value)


def test_read_only_output_and_checkpoint_folders(cfg, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse writes the way a read-only mount does
        real = Path.write_bytes

        def write_bytes(self, data):
            if self.parent == ro:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    else:
        ro.chmod(0o500)
    with pytest.raises(guards.NotWritable, match="output_dir .* is not writable \\(Permission denied\\)"):
        train(cfg.replace(output_dir=str(ro)))
    with pytest.raises(guards.NotWritable, match="checkpoints_dir .* is not writable"):
        train(cfg.replace(checkpoints_dir=str(ro), checkpointing_steps=1))
    ro.chmod(0o700)


def test_not_enough_disk_is_found_before_class_images_or_training(cfg, parts, tmp_path, monkeypatch, capsys):
    c = cfg.replace(with_prior_preservation=True, class_prompt="a photo of a star", class_dir=str(tmp_path / "cls"),
                    num_class_images=3, max_train_steps=4, checkpointing_steps=1)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=50 << 20))  # 50 MB free
    with pytest.raises(guards.DiskSpaceError) as e:
        train(c, parts, progress=False)
    msg = str(e.value)
    for part in ("Not enough disk space", "needed", "MB free", "3 class images", "2 checkpoint(s)",
                 "the trained dreambooth result", "checkpoints_dir", "use_8bit_adam=True", "checkpoints_total_limit=1"):
        assert part in msg, part
    assert not list((tmp_path / "cls").glob("*.png")), "checked before generating class images"
    assert not (Path(c.output_dir) / "model").exists() and not list(Path(c.output_dir).glob("checkpoints/step_*"))
    m = json.loads((Path(c.output_dir) / "run_manifest.json").read_text())
    assert m["status"] == "failed" and m["error"].startswith("DiskSpaceError")


def test_disk_estimate_grows_with_checkpoints_and_shrinks_with_8bit_adam(cfg, parts):
    from nbkit.training import methods

    method = methods.setup(cfg, parts)
    c = cfg.replace(max_train_steps=10, checkpointing_steps=2)
    by_what = lambda needs: {what.split(" (")[0]: n for _, n, what in needs}  # noqa: E731
    one = by_what(guards.run_disk_needs(c, parts, method, 0, 0, False))
    unet = sum(p.numel() for p in parts.unet.parameters())
    assert one["2 checkpoint(s) of " + guards.gb(unet * 12 + (1 << 20))] == 2 * (unet * 12 + (1 << 20))
    keep_all = by_what(guards.run_disk_needs(c.replace(checkpoints_total_limit=None), parts, method, 0, 4, False))
    assert any(k.startswith("3 checkpoint(s)") for k in keep_all)  # resumed at step 4: 6, 8 and 10 to come
    small = by_what(guards.run_disk_needs(c, parts, method, 0, 0, True))
    assert sum(small.values()) < sum(one.values())


def test_out_of_memory_in_the_training_step_names_settings_and_frees_memory(cfg, parts, monkeypatch):
    made = []

    def make_optimizer(*a, **k):
        opt = real_make(*a, **k)
        made.append(weakref.ref(opt))
        return opt

    real_make = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", make_optimizer)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.75 GiB total)")

    monkeypatch.setattr(F, "mse_loss", oom)
    with pytest.raises(guards.OutOfMemory) as e:
        train(cfg, parts, progress=False)
    msg = str(e.value)
    for part in ("Out of GPU memory in the training step", "Tried to allocate 2.00 GiB", "use_8bit_adam=True",
                 "gradient_checkpointing=True", "the 16 GB preset", "re-run the model-loading cell"):
        assert part in msg, part
    gc.collect()
    assert made and made[0]() is None, "the failed run's optimizer (and with it its GPU memory) was released"
    m = json.loads((Path(cfg.output_dir) / "run_manifest.json").read_text())
    assert m["status"] == "failed" and m["error"].startswith("OutOfMemory")


def test_out_of_memory_while_generating(parts, monkeypatch):
    pipe = pipeline(parts)

    def call(self, *a, **k):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    with pytest.raises(guards.OutOfMemory, match="generating images(.|\n)*batch_size=1(.|\n)*attention_slicing"):
        generate(pipe, "a star", seeds=[0], steps=2)

    def other(self, *a, **k):
        raise RuntimeError("something else")

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", other)
    with pytest.raises(RuntimeError, match="^something else$"):  # only memory errors are rewritten
        generate(pipe, "a star", seeds=[0], steps=2)


def test_non_finite_loss_keeps_the_last_good_checkpoint_and_saves_nothing_after(cfg, parts, monkeypatch):
    real, calls = F.mse_loss, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(F, "mse_loss", nan_at_step_3)
    c = cfg.replace(max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=None)
    with pytest.raises(FloatingPointError) as e:
        train(c, parts, progress=False)
    out = Path(c.output_dir)
    msg = str(e.value)
    assert "at step 3" in msg and "learning rate too high" in msg and "fp16 overflow" in msg
    assert f"The last good checkpoint is kept: {out / 'checkpoints' / 'step_000002'}" in msg
    assert [p.name for p in Checkpoints(out / "checkpoints").complete()] == ["step_000002"]
    assert not (out / "model").exists(), "nothing is saved as final"
    assert [r["step"] for r in json.loads((out / "losses.json").read_text())] == [1, 2]
    m = json.loads((out / "run_manifest.json").read_text())
    assert m["status"] == "failed" and m["steps_done"] == 2 and "FloatingPointError" in m["error"]
