import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nbkit import DataError
from nbkit.data.images import batch_indices, load_folder, read_image, scan, to_tensor


def img(path, mode="RGB", size=(96, 72), colour=(200, 10, 10), **save):
    im = Image.new("RGB", size, colour).convert(mode) if mode != "RGB" else Image.new("RGB", size, colour)
    im.save(path, **save)
    return path


def test_hidden_files_and_folders_ignored(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    img(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1junk")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._a.png").write_bytes(b"junk")
    paths, problems = scan(tmp_path)
    assert [p.name for p in paths] == ["a.png"] and problems == []


def test_non_images_and_broken_images_reported_by_name(tmp_path):
    img(tmp_path / "good.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    full = tmp_path / "full.jpg"
    img(full, size=(300, 300), format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(full.read_bytes()[:400])
    full.unlink()
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, 64)
    msg = str(e.value)
    for name in ("notes.pdf", "broken.jpg", "truncated.jpg"):
        assert name in msg
    assert "good.png" not in msg
    with pytest.warns(UserWarning, match="Skipped"):
        assert [x.path.name for x in load_folder(tmp_path, 64, skip_bad=True)] == ["good.png"]


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="has no images"):
        load_folder(tmp_path, 64)
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", 64)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    p = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)).save(p)
    else:
        img(p, mode)
    out = read_image(p)
    assert out.mode == "RGB" and out.size[0] > 0
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (255, 255, 255)


def test_transparency_composited_on_white(tmp_path):
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    im.save(tmp_path / "t.png")
    assert read_image(tmp_path / "t.png").getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").size == (40, 80)


def test_captions_and_unicode_names(tmp_path):
    img(tmp_path / "mon chien é.png")
    (tmp_path / "mon chien é.txt").write_text("a photo of zwx dog on grass", encoding="utf-8")
    img(tmp_path / "b.png")
    ex = load_folder(tmp_path, 32)
    assert {e.path.name: e.caption for e in ex} == {"b.png": None, "mon chien é.png": "a photo of zwx dog on grass"}


def test_small_image_upscaled_with_warning(tmp_path):
    img(tmp_path / "tiny.png", size=(20, 30))
    with pytest.warns(UserWarning, match="tiny.png is 20x30, smaller than the training resolution 64"):
        ex = load_folder(tmp_path, 64)
    assert to_tensor(ex[0].image, 64).shape == (3, 64, 64)


def test_to_tensor_range_crop_and_flip(tmp_path):
    im = Image.new("RGB", (100, 50), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 50, 50))  # left half blue
    t = to_tensor(im, 32)
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1
    flipped = to_tensor(im, 32, flip=True)
    assert torch.equal(flipped, t.flip(-1))


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_indices(5, 2, s, seed=3) for s in range(10)]
    b = [batch_indices(5, 2, s, seed=3) for s in range(10)]
    assert a == b
    flat = sum(a, [])
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4]  # each epoch visits every image once
    assert a != [batch_indices(5, 2, s, seed=4) for s in range(10)]


def test_huge_image_is_read_and_downscaled_early(tmp_path):
    Image.new("RGB", (6000, 4000), (1, 2, 3)).save(tmp_path / "big.jpg", quality=50)
    Image.new("RGB", (12000, 8000), (1, 2, 3)).save(tmp_path / "bigger.jpg", quality=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "big.jpg").size == (3072, 2048)  # short side MAX_SHORT_SIDE, aspect kept
        assert read_image(tmp_path / "bigger.jpg").size == (3072, 2048)  # decoded at half size, then resized
        assert read_image(tmp_path / "big.jpg", max_short_side=None).size == (6000, 4000)  # full size when asked
        with Image.open(tmp_path / "bigger.jpg") as im:
            im.draft(None, (3072, 2048))
            assert im.size == (6000, 4000)  # what read_image decodes: a quarter of the pixels, not 96 MP
    assert load_folder(tmp_path, 3000)[0].image.size == (4500, 3000)  # never below the training resolution


def test_folder_of_only_non_images_says_which_and_what_to_do(tmp_path):
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / "holiday.mov").write_bytes(b"\0\0\0\x18ftyp")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, 64)
    msg = str(e.value)
    assert "notes.pdf: not an image" in msg and "holiday.mov: not an image" in msg and "Fix or remove" in msg
    with pytest.raises(DataError, match="has no images. Put 3-10 JPEG/PNG"):
        load_folder(tmp_path, 64, skip_bad=True)


def test_image_too_large_to_read_safely_is_named(tmp_path, monkeypatch):
    img(tmp_path / "panorama.png", size=(300, 200))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # stands in for a 300-megapixel file (beyond 2x the limit)
    with pytest.raises(DataError, match="panorama.png: too large to read safely .*Resize it"):
        read_image(tmp_path / "panorama.png")


def test_16_bit_rgb_png_and_space_in_name(tmp_path):
    arr = np.zeros((20, 30, 3), dtype=np.uint16)
    arr[..., 0] = 65535  # pure red at 16 bits per channel
    import struct
    import zlib  # noqa: E401 - a 48-bit PNG written by hand: PIL cannot write one

    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in arr)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 20, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (tmp_path / "red 16 bit.png").write_bytes(png)
    out = read_image(tmp_path / "red 16 bit.png")
    assert out.mode == "RGB" and out.size == (30, 20) and out.getpixel((0, 0)) == (255, 0, 0)
