import io

from PIL import Image

from nbkit.widgets import save_uploads, upload_box


def png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_save_uploads_ipywidgets_7_and_8(tmp_path):
    v7 = {"dog 1.png": {"metadata": {"name": "dog 1.png"}, "content": png_bytes()}}
    v8 = ({"name": "../evil/dog2.png", "type": "image/png", "size": 10, "content": memoryview(png_bytes())},)
    paths = save_uploads(v7, tmp_path) + save_uploads(v8, tmp_path)
    assert sorted(p.name for p in paths) == ["dog 1.png", "dog2.png"]
    assert all(p.parent == tmp_path and Image.open(p).size == (8, 8) for p in paths)


def test_upload_box_builds_headless(tmp_path):
    box = upload_box(tmp_path)
    assert len(box.children) == 2 and str(tmp_path) in box.children[1].value
