"""Colab/Kaggle helpers without Colab: the runtime summary, Drive never mounted off Colab, course paths, the Hub
cache moved into Drive, and the course table."""

from dataclasses import replace
from pathlib import Path

import pytest

from nbkit.env import colab
from nbkit.env.runtime import Runtime
from nbkit.notebook import course
from nbkit.training import presets

T4 = Runtime("colab", "cuda", "Tesla T4", 1, 14.7, False)
CPU = Runtime("local", "cpu", None, 0, 0.0, False)


def test_check_runtime_on_a_t4_names_gpu_memory_and_preset():
    text = colab.check_runtime(T4, hub=True, preset=presets.describe_settings(presets.memory_settings(T4), T4))
    assert "Google Colab" in text and "Tesla T4, 14.7 GB, fp16 only" in text
    assert "fp16 mixed precision" in text and "8-bit AdamW" in text and "reachable" in text


@pytest.mark.parametrize("platform,advice", [("colab", "Change runtime type"), ("kaggle", "Accelerator"),
                                             ("local", "offline model")])
def test_check_runtime_without_gpu_says_what_to_do(platform, advice):
    cpu = replace(CPU, platform=platform)
    text = colab.check_runtime(cpu, hub=False, preset=presets.describe_settings(presets.memory_settings(cpu), cpu))
    assert "GPU:           none (cpu)" in text and advice in text and "full fp32" in text


def test_drive_is_never_mounted_off_colab(monkeypatch, capsys):
    monkeypatch.setattr(colab.runtime, "platform", lambda: "local")
    assert colab.mount_drive(False) is None
    assert colab.mount_drive(True) is None and "only mounted on Colab" in capsys.readouterr().out


def test_paths_local_and_on_drive(tmp_path, monkeypatch):
    monkeypatch.setattr(colab.runtime, "platform", lambda: "local")
    local = colab.paths(root=tmp_path / "course")
    assert not local.on_drive and local.class_dir == tmp_path / "course" / "class_images"
    assert not local.root.exists() and local.create().exports.is_dir()  # folders only made when asked
    drive = colab.paths(drive=tmp_path / "MyDrive")
    assert drive.on_drive and (drive.output("01_dreambooth")
                               == tmp_path / "MyDrive" / "nbkit" / "outputs" / "01_dreambooth")
    assert "Google Drive" in drive.describe() and str(drive.instance_dir) in drive.describe()


def test_hub_cache_moves_into_drive(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    local = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(local))
    target = colab.hub_cache_on_drive(tmp_path / "MyDrive")
    assert local.is_symlink() and local.resolve() == target.resolve() == (tmp_path / "MyDrive" / "nbkit" / "hf-cache")
    (local / "models--x").mkdir()  # written through the link: lands in Drive
    assert (target / "models--x").is_dir()
    assert colab.hub_cache_on_drive(tmp_path / "MyDrive") == target  # idempotent
    local.unlink()
    (local / "models--y").mkdir(parents=True)  # a local cache with downloads is left alone
    assert colab.hub_cache_on_drive(tmp_path / "MyDrive") == local and "keeping" in capsys.readouterr().out


def test_course_table_marks_fit_and_missing(tmp_path):
    (tmp_path / "01_dreambooth.ipynb").write_text("{}")
    text = course.table(15.0, notebooks_dir=tmp_path)
    lines = {line.split(" |")[0]: line for line in text.splitlines()[2:]}
    assert "fits" in lines["| `01_dreambooth`"]
    assert "coming" in lines["| 02_prior_preservation *(coming)*"]
    assert all(nb.gpu_gb <= 15 for nb in course.COURSE), "every notebook is designed for a 16 GB GPU"
    assert "too big" in course.table(8.0, notebooks_dir=tmp_path) and "CPU" in course.table(0.0, tmp_path)
    ax = course.plot_memory(15.0)
    assert len(ax.patches) == len(course.COURSE) and "15 GB" in ax.get_legend().get_texts()[0].get_text()
    assert [nb.name for nb in course.available(tmp_path)] == ["01_dreambooth"]


def test_notebook_files_off_colab_stay_local(tmp_path, monkeypatch, capsys):
    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    monkeypatch.setattr(colab.runtime, "platform", lambda: "local")
    f = colab.notebook_files("01_dreambooth", False, tmp_path / "out")
    assert (f.output_dir, f.exports, f.instance_dir, f.on_drive) == (tmp_path / "out", tmp_path / "out" / "export",
                                                                    SAMPLE_INSTANCE_DIR, False)
    assert capsys.readouterr().out.count("\n") == 1  # one line, nothing else
    f = colab.notebook_files("01_dreambooth", True, "outputs/01", "my_dog")  # asked for Drive, not on Colab
    assert f.output_dir == Path("outputs/01") and f.instance_dir == Path("my_dog") and not f.on_drive
    assert "only mounted on Colab" in capsys.readouterr().out
    assert f.path("outputs/01_dreambooth/model") == Path("outputs/01_dreambooth/model")


def test_notebook_files_on_drive(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    drive = tmp_path / "MyDrive"
    monkeypatch.setattr(colab, "mount_drive", lambda use, mountpoint=None: drive if use else None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    f = colab.notebook_files("01_dreambooth", True, "outputs/01_dreambooth", "my_dog")
    root = drive / "nbkit"
    assert f.on_drive and f.output_dir == root / "outputs" / "01_dreambooth"  # checkpoints go there too: RESUME=auto
    assert f.instance_dir == root / "instance" / "my_dog" and f.exports == root / "exports" / "01_dreambooth"
    assert f.class_dir == root / "class_images" and (tmp_path / "hf" / "hub").resolve() == (root / "hf-cache").resolve()
    assert colab.notebook_files("01", True, "/abs/out", "instance/my_dog").instance_dir == f.instance_dir
    assert colab.notebook_files("01", True, "/abs/out").output_dir == Path("/abs/out")
    (root / "outputs" / "01_dreambooth" / "model").mkdir(parents=True)
    assert f.path("outputs/01_dreambooth/model") == root / "outputs" / "01_dreambooth" / "model"
    assert f.path("someone/their-model") == Path("someone/their-model")  # a hub id stays one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "uploaded_here").mkdir()  # photos put in a local folder (the Colab file browser) are found there
    assert colab.notebook_files("01", True, "out", "uploaded_here").instance_dir == Path("uploaded_here")
    assert "Google Drive" in capsys.readouterr().out
