"""Trackers through accelerate: TensorBoard's event files read back after a short run."""

import pytest

from nbkit.training import trackers


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"), key=lambda f: len(f.parts))  # the hparams sit deeper
    assert files, f"no TensorBoard event file under {folder}"
    acc = EventAccumulator(str(files[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_auto_is_tensorboard_when_installed_and_none_means_none():
    pytest.importorskip("tensorboard")
    assert trackers.resolve("auto") == ["tensorboard"]
    assert trackers.resolve("none") == [] and trackers.resolve("") == []
    assert trackers.resolve("tensorboard") == ["tensorboard"]


def test_a_missing_tracker_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ImportError, match="pip install wandb"):
        trackers.resolve("wandb")


def test_tensorboard_gets_losses_lr_scores_and_the_validation_grid(cfg, parts):
    pytest.importorskip("tensorboard")
    from nbkit import train

    c = cfg.replace(max_train_steps=3, validation_steps=2, validation_prompts=["a photo of zwx star"],
                    num_validation_images=1, eval_steps=3, eval_seeds=1, report_to="tensorboard")
    result = train(c, parts, progress=False)
    acc = _events(trackers.logging_dir(c))
    tags = acc.Tags()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [pytest.approx(e.value, rel=1e-5) for e in loss] == result.losses  # the same numbers as losses.json
    assert [e.step for e in acc.Scalars("train/lr")] == [1, 2, 3]
    assert {"eval/subject_fidelity", "eval/prompt_fidelity", "eval/tradeoff"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("eval/tradeoff")] == [0, 3]  # the untrained baseline, then step 3
    images = acc.Images("validation")
    assert [e.step for e in images] == [2, 3]
    assert images[0].width == 64 and images[0].height == 64  # one prompt x one picture at 64 px


def test_report_to_none_writes_no_event_files(cfg, parts):
    from nbkit import train

    c = cfg.replace(report_to="none")
    train(c, parts, progress=False)
    assert not list(trackers.logging_dir(c).rglob("events.out.tfevents.*"))
