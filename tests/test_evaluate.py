"""nbkit.scores.evaluate: the DreamBooth paper's metrics on tiny CLIP/DINO models built here (saved and loaded back with
the real from_pretrained code), known answers that a wrong metric fails, and the toy judge's path."""

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nbkit.models.offline import OFFLINE_SPEC, SAMPLE_INSTANCE_DIR
from nbkit.scores import evaluate
from nbkit.toy import world as toyworld

CAPTIONS = ["a photo of a red star", "a photo of a blue circle", "a photo of a green square",
            "a photo of a yellow heart", "a photo of a purple ring", "a photo of a white triangle"]
SCENES = [toyworld.Scene(shape, colour, bg) for shape, colour, bg in
          [("star", "red", "black"), ("circle", "blue", "white"), ("square", "green", "yellow"),
           ("heart", "yellow", "purple"), ("ring", "purple", "green"), ("triangle", "white", "blue")]]


def _tiny_clip(folder, train_pairs: bool = False):
    """A CLIP with 2-layer towers (random weights), the offline model's tokenizer and a 32 px image processor;
    with train_pairs, fitted contrastively on (SCENES, CAPTIONS) so that its towers agree on them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    tok = CLIPTokenizer.from_pretrained(OFFLINE_SPEC / "tokenizer")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    model = CLIPModel(cfg)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    if train_pairs:
        batch = processor(text=CAPTIONS, images=[s.render(64) for s in SCENES], padding=True, return_tensors="pt")
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(80):
            loss = model(**batch, return_loss=True).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert loss.item() < 0.5, loss.item()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _tiny_dino(folder):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return SimpleNamespace(clip_dir=_tiny_clip(root / "clip"), dino_dir=_tiny_dino(root / "dino"),
                           clip_pairs_dir=_tiny_clip(root / "clip-pairs", train_pairs=True),
                           clip=evaluate.Clip.load(str(root / "clip"), "cpu"),
                           dino=evaluate.Dino.load(str(root / "dino"), "cpu"))


@pytest.fixture(scope="module")
def pictures():
    rng = random.Random(0)
    return [toyworld.random_scene(rng).render(64) for _ in range(5)]


def test_an_image_scores_highest_against_itself(tiny, pictures):
    for metric, model in ((evaluate.clip_i, tiny.clip), (evaluate.dino, tiny.dino)):
        m = torch.tensor([[metric([a], [b], model) for b in pictures] for a in pictures])
        assert torch.allclose(m.diagonal(), torch.ones(len(pictures)), atol=1e-5), metric.__name__
        off = m[~torch.eye(len(pictures), dtype=torch.bool)]
        assert (off < 1 - 1e-4).all(), (metric.__name__, off.max())
        assert torch.allclose(m, m.T, atol=1e-5)  # a similarity, symmetric
        # the paper's score is the mean over every (generated, reference) pair
        assert metric(pictures[:2], pictures[2:], model) == pytest.approx(m[:2, 2:].mean().item(), abs=1e-5)


def test_metrics_equal_a_direct_computation_from_the_models_outputs(tiny, pictures):
    """CLIP's own forward (its logits are logit_scale x cosine) and DINO's CLS token, by hand."""
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

    model, proc = CLIPModel.from_pretrained(tiny.clip_dir), CLIPProcessor.from_pretrained(tiny.clip_dir)
    batch = proc(text=CAPTIONS[:5], images=pictures, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    cos = out.logits_per_image / model.logit_scale.exp()
    assert evaluate.clip_t(pictures, CAPTIONS[:5], tiny.clip) == pytest.approx(cos.diagonal().mean().item(), abs=1e-5)
    img = F.normalize(out.image_embeds, dim=-1)
    direct = (img[:1] @ img[1:].T).mean().item()
    assert evaluate.clip_i(pictures[:1], pictures[1:], tiny.clip) == pytest.approx(direct, abs=1e-5)
    vit = ViTModel.from_pretrained(tiny.dino_dir, add_pooling_layer=False)
    vproc = ViTImageProcessor.from_pretrained(tiny.dino_dir)
    with torch.no_grad():
        cls = F.normalize(vit(**vproc(images=pictures, return_tensors="pt")).last_hidden_state[:, 0], dim=-1)
    assert evaluate.dino(pictures[:2], pictures[2:], tiny.dino) == pytest.approx((cls[:2] @ cls[2:].T).mean().item(),
                                                                                 abs=1e-5)


def test_clip_t_prefers_matched_prompts_when_the_towers_agree(tiny):
    """A CLIP fitted on six (picture, caption) pairs: matched pairs score clearly above shuffled ones; the same
    check with random towers shows no such gap, so the gap comes from what the model learned."""
    images = [s.render(64) for s in SCENES]
    shuffled = CAPTIONS[1:] + CAPTIONS[:1]
    fitted = evaluate.Clip.load(str(tiny.clip_pairs_dir), "cpu")
    matched_score, shuffled_score = evaluate.clip_t(images, CAPTIONS, fitted), evaluate.clip_t(images, shuffled, fitted)
    assert matched_score > shuffled_score + 0.3, (matched_score, shuffled_score)
    for i, im in enumerate(images):  # each picture's own caption is its best
        per = [evaluate.clip_t([im], c, fitted) for c in CAPTIONS]
        assert max(range(len(per)), key=per.__getitem__) == i
    rand_gap = evaluate.clip_t(images, CAPTIONS, tiny.clip) - evaluate.clip_t(images, shuffled, tiny.clip)
    assert abs(rand_gap) < matched_score - shuffled_score
    with pytest.raises(ValueError, match="6 images but 2 prompts"):
        evaluate.clip_t(images, CAPTIONS[:2], fitted)


def test_diversity_is_zero_for_one_picture_repeated(tiny, pictures):
    assert evaluate.diversity([pictures[0]] * 4, tiny.dino) == pytest.approx(0.0, abs=1e-5)
    assert evaluate.diversity(pictures, tiny.dino) > 1e-3
    assert evaluate.diversity(pictures[:3] + [pictures[0]] * 3, tiny.dino) < evaluate.diversity(pictures, tiny.dino)
    with pytest.raises(ValueError, match="at least two"):
        evaluate.diversity(pictures[:1], tiny.dino)


def test_a_missing_model_gives_a_clear_error(tmp_path):
    with pytest.raises(evaluate.EvaluatorUnavailable, match="(?s)hub cannot be reached.*eval_steps=0"):
        evaluate.Clip.load("openai/clip-vit-base-patch32", "cpu")  # HF_HUB_OFFLINE=1 in the tests
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate.EvaluatorUnavailable, match="does not hold a saved DINO model"):
        evaluate.Dino.load(str(tmp_path / "empty"), "cpu")
    with pytest.raises(evaluate.EvaluatorUnavailable, match="CLIP"):  # a real model with no hub: said at once
        evaluate.for_run("stable-diffusion-v1-5/stable-diffusion-v1-5", SAMPLE_INSTANCE_DIR, "zwx", "star",
                         verbose=False)


def test_optional_scoring_says_why_and_returns_none(capsys):
    assert evaluate.for_run("stable-diffusion-v1-5/stable-diffusion-v1-5", SAMPLE_INSTANCE_DIR, "zwx", "star",
                            optional=True) is None
    assert "No scores for this run" in capsys.readouterr().out
    assert isinstance(evaluate.for_run("offline", SAMPLE_INSTANCE_DIR, "zwx", "star", optional=True),
                      evaluate.JudgeEvaluator)


def test_for_run_picks_the_toy_judge_for_the_offline_model_and_says_why(capsys):
    ev = evaluate.for_run("offline", SAMPLE_INSTANCE_DIR, "zwx", "star", seeds=2)
    said = capsys.readouterr().out
    assert isinstance(ev, evaluate.JudgeEvaluator) and "toy judge" in said and "64 px" in said
    assert ev.subject == "zwx" and ev.contexts == ("green", "purple")  # backgrounds the pictures never show
    assert ev.prompts() == {"subject": ["a photo of zwx star"],
                            "context": ["a photo of a zwx star on a green background",
                                        "a photo of a zwx star on a purple background"],
                            "class": ["a photo of a star"]}


def test_for_run_picks_clip_and_dino_for_a_real_model(tiny, capsys):
    sd_like = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)),
                              vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512])))
    ev = evaluate.for_run(sd_like, SAMPLE_INSTANCE_DIR, "zwx", "dog", seeds=1, clip_model=str(tiny.clip_dir),
                          dino_model=str(tiny.dino_dir), device="cpu")
    assert isinstance(ev, evaluate.ClipDinoEvaluator) and "CLIP + DINO" in capsys.readouterr().out
    assert ev.prompts()["context"][0] == "a photo of zwx dog on the beach"
    refs, rng = ev.references, random.Random(1)
    other = [toyworld.random_scene(rng).render(64) for _ in range(4)]
    ctx_prompts = [p for p in ev.prompts()["context"]]
    s = ev.score({"subject": refs, "context": (other, ctx_prompts), "class": other})
    # subject fidelity over the subject's pictures of every prompt (as the paper), the plain prompt's alone too
    assert s["subject_fidelity"] == pytest.approx(evaluate.dino(refs + other, refs, ev.dino), abs=1e-6)
    assert s["subject_fidelity_plain"] == pytest.approx(evaluate.dino(refs, refs, ev.dino), abs=1e-6)
    assert s["clip_i"] == pytest.approx(evaluate.clip_i(refs + other, refs, ev.clip), abs=1e-6)
    texts = ["a photo of dog " + c for c in evaluate.REAL_CONTEXTS]  # the identifier is left out for CLIP
    assert s["prompt_fidelity"] == pytest.approx(evaluate.clip_t(other, texts, ev.clip), abs=1e-6)
    assert s["class_drift"] == pytest.approx(evaluate.dino(other, refs, ev.dino), abs=1e-6)
    p, q = s["subject_fidelity"], s["prompt_fidelity"]
    assert s["tradeoff"] == pytest.approx(2 * p * q / (p + q) if p > 0 and q > 0 else 0.0)
    assert "class_diversity" in s


def test_judge_path_on_rendered_ground_truth():
    """Rendered scenes are the truth: the subject's pictures score high, ordinary scenes about zero."""
    ev = evaluate.for_run("offline", SAMPLE_INSTANCE_DIR, "zwx", "star", verbose=False)
    rng = random.Random(11)
    subject = [toyworld.subject_scene("zwx", rng).render(64) for _ in range(8)]
    ordinary = [toyworld.random_scene(rng).render(64) for _ in range(8)]
    plain_stars = [toyworld.plain(toyworld.subject_scene("zwx", rng)).render(64) for _ in range(8)]
    ctx = [toyworld.subject_scene("zwx", rng, bg).render(64) for bg in ("green", "purple") for _ in range(4)]
    prompts = [p for p in ev.prompts()["context"] for _ in range(4)]
    good = ev.score({"subject": subject, "context": (ctx, prompts), "class": plain_stars})
    assert good["subject_fidelity"] >= 0.9 and good["prompt_fidelity"] >= 0.9 and good["class_drift"] <= 0.1
    assert good["tradeoff"] >= 0.9
    bad = ev.score({"subject": ordinary[:4], "context": (ordinary, prompts), "class": subject})
    assert bad["subject_fidelity"] <= 0.15  # ordinary scenes are not the subject
    assert bad["prompt_fidelity"] <= 0.15  # nor the shape on the background asked
    assert bad["class_drift"] >= 0.9  # the class prompt drew the subject: drift
    assert bad["tradeoff"] < good["tradeoff"]
    swapped = ev.score({"subject": subject, "context": (ctx, prompts[::-1]), "class": plain_stars})
    assert swapped["prompt_fidelity"] <= 0.1 and swapped["subject_fidelity"] >= 0.9  # green labelled purple


def test_judge_evaluator_scores_a_pipeline(parts):
    """Mechanics on the offline model (weights may be random): fixed-seed pictures, scores in [0, 1]."""
    from nbkit import pipeline

    ev = evaluate.for_run(parts, SAMPLE_INSTANCE_DIR, "zwx", "star", seeds=[0], steps=2, verbose=False)
    pipe = pipeline(parts, "ddim")
    drawn = ev.draw(pipe)
    assert len(drawn["subject"]) == 1 and len(drawn["context"][0]) == 2 and len(drawn["class"]) == 1
    assert drawn["subject"][0].size == (64, 64)
    s = ev.score(pipe)
    assert all(0.0 <= s[k] <= 1.0 for k in ("subject_fidelity", "prompt_fidelity", "class_drift", "tradeoff"))
    assert s == ev.score(drawn)  # the same seeds draw the same pictures
