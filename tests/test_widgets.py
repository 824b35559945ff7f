import io

from PIL import Image

from nbkit.notebook.widgets import save_uploads, upload_box


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


def test_prompt_playground_builds_headless_and_draws(parts, tmp_path):
    import numpy as np

    import nbkit
    from nbkit.notebook.widgets import prompt_playground

    pipe = nbkit.pipeline(parts)
    pg = prompt_playground(pipe, prompt="", steps=2, images=2, size=64, save_dir=tmp_path)
    assert pg.run() is None and "prompt" in pg.status.value  # nothing to draw yet, and it says so
    pg.prompt.value = "a photo of zwx star on a green background"
    pg.negative_prompt.value = "blurry"
    pg.scheduler.value, pg.seed.value = "euler", 7
    pg.button.click()  # the real click handler, no browser
    shown = Image.open(io.BytesIO(pg.image.value))
    assert shown.size == (128, 64) and pg.last.size == (128, 64)
    direct = nbkit.grid(nbkit.generate(pipe, "a photo of zwx star on a green background", seeds=[7, 8], steps=2,
                                       scheduler="euler", negative_prompt="blurry", size=64), cols=2)
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(direct))  # same settings, same seeds, same grid
    assert (tmp_path / "playground_seed7_euler_2.png").exists() and "seeds 7-8" in pg.status.value
    assert not pg.button.disabled
