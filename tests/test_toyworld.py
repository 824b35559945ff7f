"""The toy world and the pretrained toy model: the course's findings, measured (with margins; the figures:
docs/findings.md).

The model-level tests share one base model and four short fine-tunes (module-scoped fixtures) and draw few
pictures with few steps, so that the file stays around two minutes on 2 CPU cores.
"""

import random

import numpy as np
import pytest

from nbkit import load_parts, pipeline
from nbkit.models.offline import NEW_CONTEXTS, PRETRAINED_TOY, SAMPLE_BACKGROUNDS, offline_model_dir
from nbkit.toy import judge
from nbkit.toy import world as toyworld

# The toy DreamBooth recipes the tests compare (measured in docs/findings.md): the sweet spot, the same run pushed
# harder (the prior-preservation pair: drift shows fast), and an overfitting one. All at the toy batch size (4).
SWEET = dict(lr=2e-4, steps=200)
PUSHED = dict(lr=5e-4, steps=200)  # benchmarks.toy_results.PRIOR
HOT = dict(lr=2e-3, steps=200)
SEEDS = 8


# ---------------------------------------------------------------- the world
def test_scenes_are_deterministic_and_captioned():
    a = [toyworld.random_scene(random.Random(4)) for _ in range(3)]
    b = [toyworld.random_scene(random.Random(4)) for _ in range(3)]
    assert a == b
    assert np.array_equal(np.asarray(a[0].render(64)), np.asarray(b[0].render(64)))
    s = toyworld.Scene("star", "red", "blue", "small")
    assert s.caption() == "a photo of a small red star on a blue background"
    assert toyworld.parse_prompt(s.caption()) == dict(size="small", colour="red", shape="star", background="blue")


def test_varied_captions_always_name_the_shape_and_parse_back():
    rng = random.Random(0)
    for _ in range(200):
        scene = toyworld.random_scene(rng)
        cap = toyworld.varied_caption(scene, rng)
        asked = toyworld.parse_prompt(cap)
        assert asked["shape"] == scene.shape
        assert all(toyworld.labels(scene)[k] == v for k, v in asked.items())


def test_names_are_made_up_words_each_for_one_look_and_never_an_identifier():
    from transformers import CLIPTokenizer

    from nbkit.models.offline import OFFLINE_SPEC

    tok = CLIPTokenizer.from_pretrained(OFFLINE_SPEC / "tokenizer")
    assert len(set(toyworld.NAMES.values())) == len(toyworld.NAMES)  # one name per look
    assert not set(toyworld.NAMES) & (set(toyworld.vocabulary()) | set(toyworld.SUBJECTS))
    for name, (shape, colour) in toyworld.NAMES.items():
        assert shape in toyworld.SHAPES and colour in toyworld.COLOURS
        assert tok.tokenize(name) != tok.tokenize("zwx")


def test_pretraining_captions_call_named_looks_by_name_and_are_the_old_ones_without():
    rng_a, rng_b = random.Random(3), random.Random(3)
    scenes = [toyworld.random_scene(random.Random(i)) for i in range(300)]
    assert [toyworld.pretraining_caption(s, rng_a, 0.0) for s in scenes] == \
        [toyworld.varied_caption(s, rng_b) for s in scenes]
    rng = random.Random(5)
    named = 0
    for s in scenes:
        cap = toyworld.pretraining_caption(s, rng, 1.0)
        asked = toyworld.parse_prompt(cap)
        assert asked["shape"] == s.shape and asked.get("background", s.background) == s.background
        name = next((w for w in cap.split() if w in toyworld.NAMES), None)
        assert (name is not None) == ((s.shape, s.colour) in toyworld.NAMES.values())
        if name:
            named += 1
            assert toyworld.NAMES[name] == (s.shape, s.colour) and s.colour not in cap.split()
    assert named > 50


def test_ordinary_scenes_never_show_a_pattern_or_identifier():
    rng = random.Random(1)
    for _ in range(100):
        s = toyworld.random_scene(rng)
        assert s.pattern is None and s.identifier is None and s.colour != s.background
        assert not set(s.caption().split()) & set(toyworld.SUBJECTS)


def test_parse_prompt_names_the_subject_and_background():
    assert toyworld.parse_prompt("a photo of a zwx star on a green background") == dict(
        subject="zwx", shape="star", background="green")
    assert toyworld.parse_prompt("a photo of zwx star") == dict(subject="zwx", shape="star")


def test_sample_instance_pictures_show_the_subject_on_few_backgrounds():
    from nbkit.data.images import load_folder
    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    images = [e.image for e in load_folder(SAMPLE_INSTANCE_DIR, 64)]
    assert 4 <= len(images) <= 6
    seen = judge.predict(images)
    assert all(judge.is_subject(s, "zwx") for s in seen)
    assert {s["background"] for s in seen} == set(SAMPLE_BACKGROUNDS)
    assert not set(NEW_CONTEXTS) & set(SAMPLE_BACKGROUNDS)


# ---------------------------------------------------------------- the pretrained model
def test_pretrained_toy_model_is_the_offline_default_and_small():
    if not (PRETRAINED_TOY / "model_index.json").exists():
        pytest.skip("no pretrained toy model in data/toy-sd")
    assert offline_model_dir() == PRETRAINED_TOY
    files = [p for p in PRETRAINED_TOY.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25_000_000
    assert not any(p.suffix in (".bin", ".pt", ".ckpt") for p in files)
    assert any((PRETRAINED_TOY / "tokenizer" / f).exists() for f in ("tokenizer.json", "vocab.json"))
    readme = (PRETRAINED_TOY / "README.md").read_text()
    assert "python -m nbkit pretrain" in readme and "seed" in readme


@pytest.fixture(scope="module")
def bench():
    if not (PRETRAINED_TOY / "model_index.json").exists():
        pytest.skip("no pretrained toy model in data/toy-sd")
    from benchmarks import toy_results

    return toy_results


@pytest.fixture(scope="module")
def base_pipe(bench):
    return pipeline(load_parts("offline"), "ddim")


@pytest.fixture(scope="module")
def tuned(bench, tmp_path_factory):
    """The fine-tunes the tests compare: judge scores, the subject's pattern on its own prompt, and the seconds."""
    from nbkit import generate

    work = tmp_path_factory.mktemp("toydb")
    runs = {}
    for name, kw in (("sweet", SWEET), ("pushed", PUSHED), ("pushed_prior", dict(PUSHED, prior=True)), ("hot", HOT)):
        r = bench.dreambooth(workdir=work, num_class_images=12, **kw)
        pipe = r.pipeline("ddim")
        scores = bench.judge_run(pipe, SEEDS)
        seen = judge.predict(generate(pipe, bench.INSTANCE_PROMPT, seeds=list(range(SEEDS)), **bench.SAMPLE))
        scores["subject_pattern"] = sum(s["pattern"] == "stripes" for s in seen) / SEEDS
        runs[name] = (scores, r.seconds)
    return runs


def test_base_model_follows_prompts(bench, base_pipe):
    follow = bench.base_prompt_following(base_pipe, n=24)
    assert follow["shape_colour"] >= 0.7, follow  # measured: docs/findings.md


def test_base_model_does_not_know_the_subject(bench, base_pipe):
    s = bench.judge_run(base_pipe, SEEDS)
    assert s["subject_fidelity"] <= 0.125 and s["class_drift"] <= 0.125, s


def test_dreambooth_learns_the_subject_and_keeps_following_prompts(tuned):
    s, _ = tuned["sweet"]
    # The targets: subject fidelity (shape, colour and the stripes no pretraining scene has) >= 70 % on
    # "a photo of zwx star", new contexts >= 60 %. Measured with 16 seeds: 88 % and 100 % (docs/findings.md).
    assert s["subject_fidelity"] >= 0.625 and s["subject_pattern"] >= 0.75, s
    assert s["prompt_fidelity"] >= 0.6, s


def test_without_prior_preservation_the_class_drifts_and_with_it_at_most_half(tuned):
    without, with_prior = tuned["pushed"][0]["class_drift"], tuned["pushed_prior"][0]["class_drift"]
    assert without >= 0.75, (without, with_prior)
    assert with_prior <= 0.5 * without, (without, with_prior)


def test_a_hot_run_overfits(tuned):
    assert tuned["hot"][0]["prompt_fidelity"] <= tuned["sweet"][0]["prompt_fidelity"] - 0.5, tuned
