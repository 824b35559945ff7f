"""nbkit.toy.pretrain on a tiny budget: the whole path writes a loadable pipeline, a killed run resumes to the same
weights, and the learning rate follows its warm-up, stable and cool-down phases (the shipped model:
data/toy-sd/README.md)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nbkit import generate, load_parts, pipeline
from nbkit.models.layout import layout_problems
from nbkit.toy import pretrain

TINY = dict(vae_steps=4, vae_batch=4, n_scenes=16, steps=6, batch=4, warmup=2, cooldown=2, checkpoint_every=2,
            threads=1)


def _unet(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return pretrain.pretrain(pretrain.PretrainConfig(**TINY), root / "out", root / "work")


def test_pretraining_writes_a_pipeline_the_kit_loads(finished):
    files = [p for p in finished.rglob("*") if p.is_file()]
    assert not any(p.suffix in (".bin", ".pt", ".ckpt", ".pkl") for p in files)
    assert json.loads((finished / "pretrain_config.json").read_text())["steps"] == TINY["steps"]
    assert "python -m nbkit pretrain" in (finished / "README.md").read_text()
    assert layout_problems(finished) == []  # text encoder and tokenizer as transformers 4.x reads them
    image = generate(pipeline(load_parts(str(finished)), "ddim"), "a photo of a red star", seeds=[0], steps=2)[0]
    assert image.size == (64, 64)


def test_a_killed_run_resumes_to_the_same_weights(finished, tmp_path, monkeypatch):
    saves = []
    real = pretrain._save_state

    def killed_after_first_unet_checkpoint(path, state):
        real(path, state)
        if "ema" in state:
            saves.append(state["step"])
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "_save_state", killed_after_first_unet_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(pretrain.PretrainConfig(**TINY), tmp_path / "out", tmp_path / "work")
    assert saves == [2] and not (tmp_path / "out").exists()
    monkeypatch.setattr(pretrain, "_save_state", real)
    resumed = pretrain.pretrain(pretrain.PretrainConfig(**TINY), tmp_path / "out", tmp_path / "work")
    a, b = _unet(finished), _unet(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_in_the_same_work_folder_are_refused(finished):
    work = finished.parent / "work"
    with pytest.raises(SystemExit, match="other settings"):
        pretrain.pretrain(pretrain.PretrainConfig(**{**TINY, "steps": 7}), finished.parent / "o2", work)


def test_learning_rate_warms_up_holds_and_cools_down():
    f = [pretrain._warmup_stable_decay(s, warmup=10, total=100, cooldown=20) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[79] == 1.0
    assert f[99] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[80:], f[81:]))
    assert pretrain._warmup_stable_decay(99, 10, 100, 0) == 1.0
