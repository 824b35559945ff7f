import json

import numpy as np
import pytest
import torch
from PIL import Image

from nbkit import generate, pipeline
from nbkit.sample.compare import embedding_shift, pixel_distance, scheduler_grid, side_by_side


def test_scheduler_grid_has_every_cell_on_the_same_seeds_without_reloading(parts, tmp_path):
    pipe = pipeline(parts, "pndm")
    unet, sched = pipe.unet, pipe.scheduler
    names, steps, seeds = ["pndm", "ddim", "euler_a"], [2, 3], [0, 1]  # all six: the 03 notebook's smoke run
    g = scheduler_grid(pipe, "a photo of a red star", names, steps, seeds, size=64, progress=False)
    assert g.missing() == []
    assert set(g.images) == {(s, n) for s in names for n in steps}
    assert all(len(v) == 2 and all(im.size == (64, 64) for im in v) for v in g.images.values())
    assert all(sec > 0 for sec in g.seconds.values())
    assert pipe.unet is unet and pipe.scheduler is sched  # swapped in place, then put back: never reloaded
    # each cell is exactly what generate() makes with that scheduler and seed
    ref = generate(pipe, "a photo of a red star", seeds=[1], steps=3, size=64, scheduler="ddim")[0]
    assert np.abs(np.asarray(ref, dtype=int) - np.asarray(g.images[("ddim", 3)][1], dtype=int)).max() <= 1
    # the cells differ between schedulers (it is not one image copied around)
    assert not np.array_equal(np.asarray(g.images[("ddim", 3)][0]), np.asarray(g.images[("euler_a", 3)][0]))

    paths = g.save(tmp_path)
    saved = json.loads(paths["timings"].read_text())
    assert {(c["scheduler"], c["steps"]) for c in saved["cells"]} == set(g.images)
    assert all((tmp_path / f).exists() for c in saved["cells"] for f in c["images"])
    img = Image.open(paths["grid"])
    assert img.size[1] > len(names) * 128  # a row of >=128 px tall cells per scheduler, plus labels
    assert all(s in g.table() for s in names) and "s" in g.table()


def test_scheduler_grid_measures_each_cell_against_a_many_step_reference(parts, tmp_path):
    pipe = pipeline(parts, "pndm")
    g = scheduler_grid(pipe, "a photo of a red star", ["ddim", "euler", "euler_a"], [2, 8], [0, 1], size=64,
                       reference=("ddim", 8), warmup=False, progress=False)
    assert len(g.reference_images) == 2 and set(g.measures) == set(g.images)
    assert all(0 <= m["high_frequency"] < 1 and 0 <= m["distance"] <= 1 for m in g.measures.values())
    assert g.measures[("ddim", 8)]["distance"] == 0  # the reference's own scheduler and steps: the same pictures
    assert g.measures[("ddim", 2)]["distance"] > g.measures[("euler", 8)]["distance"] > 0  # more steps: closer
    assert [s for s, _ in g.cleanest(8)] == ["ddim", "euler"]  # ancestral: no single picture, not ranked
    assert {s for s, _ in g.cleanest(8, by="high_frequency")} == {"ddim", "euler", "euler_a"}
    assert "distance to ddim 8 steps" in g.summary() and "high-frequency energy" in g.table()
    saved = json.loads(g.save(tmp_path)["timings"].read_text())
    assert saved["reference"]["steps"] == 8 and all((tmp_path / f).exists() for f in saved["reference"]["images"])
    cell = next(c for c in saved["cells"] if (c["scheduler"], c["steps"]) == ("ddim", 2))
    assert cell["distance"] == pytest.approx(g.measures[("ddim", 2)]["distance"])
    plain = scheduler_grid(pipe, "a star", ["ddim"], [2], [0], size=64, warmup=False, progress=False)
    assert plain.reference_images == [] and set(plain.measures[("ddim", 2)]) == {"high_frequency"}


def test_scheduler_grid_refuses_an_empty_axis(parts):
    with pytest.raises(ValueError, match="at least one"):
        scheduler_grid(pipeline(parts), "a star", [], [2], [0])
    with pytest.raises(ValueError, match="unknown scheduler"):
        scheduler_grid(pipeline(parts), "a star", ["nope"], [2], [0], progress=False)


def test_a_missing_cell_is_reported(parts):
    g = scheduler_grid(pipeline(parts), "a star", ["ddim"], [2], [0], size=64, warmup=False, progress=False)
    del g.images[("ddim", 2)]
    assert g.missing() == [("ddim", 2)]


def test_side_by_side_layout():
    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    out = side_by_side({"before": [red, red, red], "after prior preservation": [blue, blue]},
                       col_labels=["a", "b", "c"], captions={"before": ["1", "2", "3"]})
    assert out.size[0] > 3 * 128 and out.size[1] > 2 * 128
    px = np.asarray(out)
    assert (px == [255, 0, 0]).all(-1).sum() == 3 * 128 * 128  # three cells upscaled to 128 px
    assert (px == [0, 0, 255]).all(-1).sum() == 2 * 128 * 128  # the short row is left blank at the end
    with pytest.raises(ValueError, match="one label per column"):
        side_by_side({"x": [red]}, col_labels=["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        side_by_side({})


def test_pixel_distance():
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 255, 255))
    assert pixel_distance([black, white], [black, white]) == 0
    assert pixel_distance([black], [white]) == pytest.approx(1.0)
    assert pixel_distance([black, black], [black, white]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equally long"):
        pixel_distance([black], [])


def test_embedding_shift_sees_which_prompts_moved(parts):
    import copy

    prompts = ["a photo of zwx star", "a photo of a circle"]
    same = embedding_shift(parts.tokenizer, parts.text_encoder, parts.text_encoder, prompts)
    assert all(abs(v) < 1e-6 for v in same.values())
    other = copy.deepcopy(parts.text_encoder)
    zwx = parts.tokenizer.convert_tokens_to_ids("zwx</w>")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)  # (a constant shift would vanish in CLIP's layer norms)
        other.get_input_embeddings().weight[zwx] += torch.randn(other.config.hidden_size, generator=g)
    moved = embedding_shift(parts.tokenizer, parts.text_encoder, other, prompts)
    assert moved["a photo of zwx star"] > 1e-3 and abs(moved["a photo of a circle"]) < 1e-6
