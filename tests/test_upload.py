"""Uploading photos in one step: `nb.photos(folder, size, upload=True)` opens Colab's upload dialog (a faked
google.colab.files here), saves the files into the folder, then loads and checks every picture; it never waits
outside an interactive Colab notebook."""

import io
import sys
import types

import pytest
from PIL import Image

from nbkit.data.images import DataError
from nbkit.env import colab
from nbkit.notebook import widgets


def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), colour).save(buf, format="PNG")
    return buf.getvalue()


UPLOADS = {"dog 1.png": png((200, 10, 10)), "dog2.png": png((10, 200, 10)), "dog3.png": png((10, 10, 200))}


def fake_colab(monkeypatch, upload, interactive=True):
    """google.colab.files with `upload`, and (interactive) this process looking like Colab's front end."""
    files = types.SimpleNamespace(upload=upload)
    mod = types.ModuleType("google.colab")
    mod.files = files
    if "google" not in sys.modules:
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", mod)
    monkeypatch.setattr(colab, "_interactive_colab", lambda: interactive)


def test_one_call_uploads_saves_and_checks(tmp_path, monkeypatch):
    calls = []

    def upload(target_dir=""):  # today's Colab: writes into target_dir and returns {name: bytes}
        calls.append(target_dir)
        for name, data in UPLOADS.items():
            (tmp_path / "my_dog" / name).write_bytes(data)
        return dict(UPLOADS)

    fake_colab(monkeypatch, upload)
    examples = widgets.photos(tmp_path / "my_dog", 64, upload=True)
    assert calls == [str(tmp_path / "my_dog")]
    assert sorted(p.name for p in (tmp_path / "my_dog").iterdir()) == sorted(UPLOADS)
    assert len(examples) == 3 and all(e.image.mode == "RGB" and e.image.size == (80, 80) for e in examples)


def test_older_colab_upload_into_the_working_folder_is_moved(tmp_path, monkeypatch):
    work = tmp_path / "content"
    work.mkdir()
    monkeypatch.chdir(work)

    def upload():  # older Colab: no target_dir, the files land in the working folder
        for name, data in UPLOADS.items():
            (work / name).write_bytes(data)
        return dict(UPLOADS)

    fake_colab(monkeypatch, upload)
    examples = widgets.photos(tmp_path / "my_dog", 64, upload=True)
    assert len(examples) == 3 and sorted(p.name for p in (tmp_path / "my_dog").iterdir()) == sorted(UPLOADS)
    assert not list(work.iterdir()), "the stray copies in the working folder are removed"


def test_a_broken_upload_is_named(tmp_path, monkeypatch):
    fake_colab(monkeypatch, lambda target_dir="": {"good.png": UPLOADS["dog2.png"], "broken.jpg": b"not a picture"})
    with pytest.raises(DataError, match="broken.jpg"):
        widgets.photos(tmp_path / "my_dog", 64, upload=True)
    assert (tmp_path / "my_dog" / "broken.jpg").exists()  # saved, so the student can see and delete it


def test_never_waits_outside_interactive_colab(tmp_path, monkeypatch, capsys):
    def upload(target_dir=""):
        raise AssertionError("the upload dialog must not open in a headless run")

    fake_colab(monkeypatch, upload, interactive=False)
    folder = tmp_path / "my_dog"
    folder.mkdir()
    for name, data in UPLOADS.items():
        (folder / name).write_bytes(data)
    assert len(widgets.photos(folder, 64, upload=True)) == 3
    assert "copy 3-10 photos" in capsys.readouterr().out
    fake_colab(monkeypatch, upload, interactive=True)
    assert len(widgets.photos(folder, 64, upload=False)) == 3  # UPLOAD off: just the folder


def test_upload_into_the_kits_sample_is_refused(monkeypatch):
    from nbkit.paths import SAMPLE_INSTANCE_DIR

    fake_colab(monkeypatch, lambda target_dir="": {})
    with pytest.raises(ValueError, match="INSTANCE_DIR"):
        widgets.photos(SAMPLE_INSTANCE_DIR, 64, upload=True)


def test_notebooks_upload_in_their_photos_cell():
    """01, 05, 06 and 08 have UPLOAD, and their photos cell is the one nb.photos call (no separate upload box)."""
    import nbformat

    from nbkit.paths import NOTEBOOKS_DIR

    for name in ("01_dreambooth", "05_textual_inversion", "06_lora", "08_sdxl_lora"):
        nb = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        assert any("nb.photos(setup.instance_dir, setup.resolution, upload=UPLOAD)" in s for s in code), name
        assert not any("upload_box" in s for s in code), name
