import os
import random
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NBKIT_CACHE", str(ROOT / ".cache" / "nbkit"))


@pytest.fixture(scope="session")
def offline_dir():
    from nbkit.models.offline import offline_model_dir

    return offline_model_dir()


@pytest.fixture
def parts(offline_dir):
    from nbkit import load_parts

    return load_parts("offline")


@pytest.fixture
def instance_dir(tmp_path):
    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    d = tmp_path / "instance"
    shutil.copytree(SAMPLE_INSTANCE_DIR, d)
    return d


@pytest.fixture
def cfg(instance_dir, tmp_path):
    from nbkit import TrainConfig

    return TrainConfig(instance_dir=str(instance_dir), output_dir=str(tmp_path / "out"), resolution=64,
                       max_train_steps=2, learning_rate=1e-3, validation_steps=0, sample_steps=3)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    torch.manual_seed(0)
