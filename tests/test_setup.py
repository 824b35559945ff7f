"""nb.setup, the first code cell of every notebook: what it decides on this (GPU-less, offline) machine."""

from pathlib import Path

import pytest

import nbkit as nb
from nbkit.env import runtime
from nbkit.models import offline
from nbkit.notebook.session import OFFLINE_BACKGROUNDS, is_offline_model

GPU_HUB = runtime.Runtime("colab", "cuda", "Tesla T4", 1, 14.75, False)


@pytest.fixture
def cpu(monkeypatch):
    cpu = runtime.Runtime("local", "cpu", None, 0, 0.0, False)
    monkeypatch.setattr(runtime, "detect", lambda: cpu)
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: False)
    return cpu


def test_auto_on_a_cpu_is_the_small_offline_model(cpu, tmp_path, capsys):
    s = nb.setup("01_dreambooth", output_dir=tmp_path / "out", resolution=512)
    assert s.rt is cpu and s.model == "offline" and s.small
    assert s.resolution == offline.OFFLINE_RESOLUTION  # RESOLUTION is for SD 1.5
    assert s.pick(5e-4, 2e-6) == 5e-4 and s.pick("offline", "sd") == "offline"
    assert s.out == tmp_path / "out" and s.out.is_dir()  # the output folder is made
    assert s.instance_dir == Path(offline.SAMPLE_INSTANCE_DIR) and s.instance_dir.is_dir()  # "sample": the toy subject
    assert s.files.exports == s.out / "export"
    assert s.device == "cpu" and s.sample_dtype is None
    printed = capsys.readouterr().out
    assert s.report in printed and s.why in printed and "OFFLINE model" in printed  # said once, with the reason


def test_the_offline_folder_counts_as_small(cpu, tmp_path):
    folder = str(offline.offline_model_dir())
    assert is_offline_model("offline") and is_offline_model(folder) and is_offline_model(Path(folder))
    s = nb.setup("02_prior_preservation", model=folder, output_dir=tmp_path)
    assert s.small and s.model == folder and s.resolution == offline.OFFLINE_RESOLUTION
    assert s.why == f"using {folder!r} as asked"


def test_another_model_is_not_small(cpu, tmp_path):
    assert not is_offline_model(runtime.SD15) and not is_offline_model(tmp_path)
    s = nb.setup("03_schedulers", model=runtime.SD15, output_dir=tmp_path / "o", resolution=768)
    assert not s.small and s.resolution == 768 and s.pick(5e-4, 2e-6) == 2e-6
    assert s.contexts("zwx dog")[0] == "a photo of zwx dog on the beach" and len(s.contexts("zwx dog")) == 4


def test_smoke_values(cpu, tmp_path):
    smoke = nb.setup("06_lora", output_dir=tmp_path / "a", smoke=True)
    real = nb.setup("06_lora", output_dir=tmp_path / "b")
    assert smoke.is_smoke and not real.is_smoke
    assert (smoke.smoke((4, 2, 3), (400, 100, 50)) == (4, 2, 3)
            and real.smoke((4, 2, 3), (400, 100, 50)) == (400, 100, 50))


def test_offline_contexts_are_plain_backgrounds(cpu, tmp_path):
    s = nb.setup("01_dreambooth", output_dir=tmp_path)
    assert s.contexts("zwx star") == [f"a photo of a zwx star on a {bg} background" for bg in OFFLINE_BACKGROUNDS]
    assert OFFLINE_BACKGROUNDS == offline.NEW_CONTEXTS  # what the judge and docs/findings.md call new contexts
    assert not set(OFFLINE_BACKGROUNDS) & set(offline.SAMPLE_BACKGROUNDS)  # never a background of the pictures
    assert s.contexts("zwx", backgrounds=("green",)) == ["a photo of a zwx on a green background"]


def test_default_output_folder_and_gpu_sampling(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "detect", lambda: GPU_HUB)
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: True)
    import torch

    s = nb.setup("04_text_encoder")
    assert s.model == runtime.SD15 and not s.small and s.resolution == 512
    assert s.out == Path("outputs/04_text_encoder") and (tmp_path / "outputs/04_text_encoder").is_dir()
    assert s.device == "cuda" and s.sample_dtype is torch.float16


def test_checkpoints_in_drive_mount_only_on_colab(cpu, monkeypatch, tmp_path):
    from nbkit.env import colab

    mounted = []  # notebook_files asks too, with use_drive=False: count the True calls
    monkeypatch.setattr(colab, "mount_drive", lambda use=True, mountpoint=colab.DRIVE_MOUNTPOINT: mounted.append(use))
    nb.setup("01_dreambooth", output_dir=tmp_path, checkpoints_dir="/content/drive/MyDrive/nbkit")
    assert True not in mounted  # not on Colab: nothing to mount
    monkeypatch.setattr(runtime, "detect", lambda: runtime.Runtime("colab", "cpu", None, 0, 0.0, False))
    nb.setup("01_dreambooth", output_dir=tmp_path, checkpoints_dir="/content/drive/MyDrive/nbkit")
    assert mounted.count(True) == 1


def test_an_sdxl_notebook_offline_gets_the_tiny_sdxl_at_64_px(cpu, tmp_path, capsys):
    from nbkit.models import sdxl

    s = nb.setup("08_sdxl_lora", family="sdxl", output_dir=tmp_path / "o", resolution=1024, class_noun="auto")
    assert s.model == "tiny-sdxl" and s.small and s.family == "sdxl"
    assert s.resolution == sdxl.TINY_SDXL_RESOLUTION  # RESOLUTION = 1024 is SDXL base's
    assert s.class_noun == "star" and s.instance_dir == Path(offline.SAMPLE_INSTANCE_DIR)  # the toy star, no download
    assert s.pick("tiny", "base") == "tiny" and s.contexts("zwx star")[0].endswith("background")
    out = capsys.readouterr().out
    assert "OFFLINE model of SDXL" in out and "NOT pretrained" in out
    assert is_offline_model("tiny-sdxl") and is_offline_model(sdxl.TINY_SDXL) and is_offline_model(str(sdxl.TINY_SDXL))
    assert isinstance(nb.load_parts(s.model), sdxl.SDXLParts)  # what the name loads: SDXL's parts
    folder = nb.setup("08_sdxl_lora", family="sdxl", model=str(sdxl.TINY_SDXL), output_dir=tmp_path / "p")
    assert folder.small and folder.resolution == 64
    assert nb.setup("01_dreambooth", output_dir=tmp_path / "q").family == "sd"
