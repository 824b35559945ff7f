"""The toy judge: accurate on held-out rendered scenes, and its three scores mean what they say."""

import random

import pytest

from nbkit.toy import judge
from nbkit.toy import world as toyworld


@pytest.fixture(scope="module")
def held_out():
    """Scenes the judge never saw (another seed), rendered clean and degraded."""
    rng = random.Random(12345)
    scenes = [judge.sample_scene(rng) for _ in range(240)]
    clean = [s.render(64) for s in scenes]
    degraded = [judge._degrade(im, rng) for im in clean]
    return scenes, clean, degraded


def test_judge_is_accurate_on_held_out_scenes(held_out):
    scenes, clean, degraded = held_out
    for images in (clean, degraded):
        seen = judge.predict(images)
        for head in ("shape", "colour", "background", "pattern"):
            acc = sum(s[head] == toyworld.labels(sc)[head] for s, sc in zip(seen, scenes)) / len(scenes)
            assert acc >= 0.9, (head, acc)


def test_weights_are_small_safetensors_with_their_recipe():
    meta = __import__("json").loads((judge.JUDGE_DIR / "judge.json").read_text())
    assert (judge.JUDGE_DIR / "judge.safetensors").stat().st_size < 2_000_000
    assert meta["command"].startswith(("python -m nbkit judge", "python -m nbkit.judge"))  # older: the module form
    assert min(meta["held_out_accuracy"].values()) >= 0.9


def test_subject_fidelity_and_drift_on_rendered_ground_truth():
    rng = random.Random(7)
    subject = [toyworld.subject_scene("zwx", rng).render(64) for _ in range(12)]
    plain_stars = [toyworld.plain(toyworld.subject_scene("zwx", rng)).render(64) for _ in range(12)]
    other = [toyworld.subject_scene("qlo", rng).render(64) for _ in range(12)]
    assert judge.subject_fidelity(subject, "zwx") >= 0.9
    assert judge.subject_fidelity(plain_stars, "zwx") <= 0.1  # the class without the pattern is not the subject
    assert judge.subject_fidelity(other, "zwx") <= 0.1
    assert judge.class_drift(subject, "zwx") >= 0.9 and judge.class_drift(plain_stars, "zwx") <= 0.1


def test_prompt_fidelity_reads_the_prompt():
    rng = random.Random(3)
    scene = toyworld.Scene("triangle", "red", "green")
    img = scene.render(64)
    assert judge.prompt_fidelity([img], "a photo of a red triangle on a green background") == 1.0
    assert judge.prompt_fidelity([img], "a photo of a red triangle") == 1.0  # only what the prompt names
    assert judge.prompt_fidelity([img], "a photo of a blue triangle on a green background") == 0.0
    assert judge.prompt_fidelity([img], "a photo of a red circle", ("colour",)) == 1.0
    subject = toyworld.subject_scene("zwx", rng, "purple").render(64)
    assert judge.prompt_fidelity([subject], "a photo of a zwx star on a purple background",
                                 ("shape", "background")) == 1.0


def test_scores_from_images_already_drawn():
    rng = random.Random(5)
    subj = [toyworld.subject_scene("zwx", rng, bg).render(64) for bg in ("green", "purple")]
    prompts = ["a photo of a zwx star on a green background", "a photo of a zwx star on a purple background"]
    s = judge.scores({"subject": subj, "context": (subj, prompts), "class": subj})
    assert s == {"subject_fidelity": 1.0, "prompt_fidelity": 1.0, "class_drift": 1.0}


def test_scores_refuses_a_model_it_cannot_judge():
    class Cfg:
        sample_size, block_out_channels = 64, [1, 2, 3, 4]

    class Pipe:
        unet = vae = type("M", (), {"config": Cfg})()

    with pytest.raises(ValueError, match="only knows the toy world"):
        judge.scores(Pipe())
