import shutil

import pytest
from PIL import Image

from nbkit import train
from nbkit.data.class_images import choose_class_images, default_class_dir, ensure_class_images
from nbkit.data.images import DataError
from nbkit.env import colab
from nbkit.env.colab import drive_folder


def test_default_class_dir_is_stable_readable_and_keyed_by_settings(tmp_path):
    a = default_class_dir("a photo of a dog", "sd15", 512, root=tmp_path)
    assert a == default_class_dir("a photo of a dog", "sd15", 512, root=tmp_path)  # the next run finds them
    assert a.parent == tmp_path and a.name.startswith("a_photo_of_a_dog-")
    others = {default_class_dir("a photo of a cat", "sd15", 512, root=tmp_path),
              default_class_dir("a photo of a dog", "other", 512, root=tmp_path),
              default_class_dir("a photo of a dog", "sd15", 768, root=tmp_path),
              default_class_dir("a photo of a dog", "sd15", 512, root=tmp_path, steps=3)}
    assert a not in others and len(others) == 4  # smoke-quality images never leak into a real run


def test_only_missing_class_images_are_generated(parts, tmp_path, capsys):
    folder = tmp_path / "cls"
    first = ensure_class_images(parts, "a photo of a star", folder, 2, 64, steps=2, batch_size=2)
    assert len(first) == 2 and "2 generated, 0 reused" in capsys.readouterr().out
    stamps = [p.stat().st_mtime_ns for p in first]
    more = ensure_class_images(parts, "a photo of a star", folder, 3, 64, steps=2, batch_size=2)
    assert len(more) == 3 and "1 generated, 2 reused" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in more[:2]] == stamps
    assert all(Image.open(p).size == (64, 64) for p in more)
    assert not list(folder.glob(".*.tmp"))  # written atomically
    with pytest.raises(DataError, match="made for 'a photo of a star'"):
        ensure_class_images(parts, "a photo of a circle", folder, 3, 64, steps=2)


def test_generate_source_uses_the_cache(tmp_path):
    c = choose_class_images("generate", "a photo of a star", "m", 64, 10, cache_root=tmp_path, steps=3)
    assert c.generated and c.count == 10 and c.folder.parent == tmp_path
    assert c.train_settings() == {"class_dir": str(c.folder), "num_class_images": 10}


def test_users_own_class_images_are_used_as_they_are(cfg, parts, tmp_path, instance_dir):
    mine = tmp_path / "my_dogs"
    shutil.copytree(instance_dir, mine)
    before = sorted(p.name for p in mine.rglob("*"))
    c = choose_class_images(str(mine), "a photo of a star", parts.source, 64, 100)
    assert not c.generated and c.count == 5 and "fewer than the 100" in c.note
    r = train(cfg.replace(with_prior_preservation=True, class_prompt="a photo of a star", **c.train_settings()),
              parts, progress=False)
    assert sorted(p.name for p in mine.rglob("*")) == before  # nothing generated or written into the user's folder
    assert all("prior" in row for row in __import__("json").loads((r.output_dir / "losses.json").read_text()))


def test_bad_user_class_folders_are_explained(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        choose_class_images(str(tmp_path / "nope"), "a photo of a dog", "m", 64, 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        choose_class_images(str(tmp_path / "empty"), "a photo of a dog", "m", 64, 10)
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    (tmp_path / "mixed" / "notes.docx").write_text("x")
    with pytest.raises(DataError, match="notes.docx"):
        choose_class_images(str(tmp_path / "mixed"), "a photo of a dog", "m", 64, 10)
    with pytest.raises(ValueError, match="at least 1"):
        choose_class_images("generate", "a photo of a dog", "m", 64, 0)


def test_drive_is_never_mounted_headless(tmp_path, monkeypatch):
    monkeypatch.setattr(colab, "DRIVE_MOUNTPOINT", str(tmp_path / "drive"))
    folder, why = drive_folder("nbkit/class_images")
    assert folder is None and "not mounted" in why  # returned at once, no consent prompt waited for
    c = choose_class_images("generate", "a photo of a dog", "m", 64, 4, cache_root=tmp_path / "local",
                            drive_subfolder="nbkit/class_images")
    assert c.folder.parent == tmp_path / "local"


def test_drive_already_mounted_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(colab, "DRIVE_MOUNTPOINT", str(tmp_path / "drive"))
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    c = choose_class_images("generate", "a photo of a dog", "m", 64, 4, cache_root=tmp_path / "local",
                            drive_subfolder="nbkit/class_images")
    assert c.folder.parent == tmp_path / "drive" / "MyDrive" / "nbkit" / "class_images" and "Google Drive" in c.note
