"""What a notebook trains on: INSTANCE_DIR = "sample" is the toy star offline and the diffusers docs' dog photos on
Stable Diffusion (the hub's answer faked here: no network; the branch taken is the kit's own), and a learner's own
ordinary photos train on the offline model, unscored, said once."""

import fnmatch
import math
from pathlib import Path

import pytest
import torch
from _photos import NON_ASCII, photo, write_odd_photos
from huggingface_hub import errors as hub_errors
from PIL import Image

import nbkit as nb
from nbkit import ConfigError, DataError
from nbkit.data import subject
from nbkit.data.images import load_folder
from nbkit.env import runtime
from nbkit.paths import SAMPLE_INSTANCE_DIR
from nbkit.scores import evaluate, tracking

GPU = runtime.Runtime("colab", "cuda", "Tesla T4", 1, 14.75, False)
REPO_FILES = [".gitattributes", "README.md", "alvan-nee-1.jpeg", "alvan-nee-2.jpeg", "alvan-nee-3.jpeg"]


class FakeHub:
    """huggingface_hub.snapshot_download as the hub answers it for diffusers/dog-example: the repo's files that
    allow_patterns lets through (as huggingface_hub filters them), written into local_dir; or an error."""

    def __init__(self, error: Exception | None = None, broken: str = ""):
        self.error, self.broken, self.calls = error, broken, []

    def __call__(self, repo_id, *, repo_type=None, local_dir=None, allow_patterns=None, **kw):
        self.calls.append({"repo_id": repo_id, "repo_type": repo_type, "local_dir": local_dir, **kw})
        if self.error:
            raise self.error
        folder = Path(local_dir)
        (folder / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # the hub's own bookkeeping
        for i, name in enumerate(REPO_FILES):
            if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                continue
            if name == self.broken:
                (folder / name).write_bytes(b"\xff\xd8 cut short")
            elif name.endswith(".jpeg"):
                photo((120, 90), seed=i).save(folder / name, quality=90)
            else:
                (folder / name).write_text("not a picture")
        return str(folder)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The kit cache in tmp_path; the hub reachable; snapshot_download answered by a FakeHub (returned)."""
    import huggingface_hub

    monkeypatch.setenv("NBKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: True)
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_sample_on_the_offline_model_is_the_toy_star(hub):
    s = subject.choose("sample", "auto", offline_model=True)
    assert s.instance_dir == Path(SAMPLE_INSTANCE_DIR) and s.class_noun == "star" and s.kind == "toy"
    assert "toy star" in s.why and "'star'" in s.why
    assert hub.calls == []  # nothing downloaded for the offline model


def test_sample_on_stable_diffusion_is_the_dog_photos_downloaded_once(hub, tmp_path):
    s = subject.choose("sample", "auto", offline_model=False, model=runtime.SD15)
    assert s.kind == "dog" and s.class_noun == "dog"
    assert s.instance_dir == tmp_path / "cache" / "subjects" / "dog-example"  # the kit cache
    assert hub.calls == [{"repo_id": "diffusers/dog-example", "repo_type": "dataset", "local_dir": str(s.instance_dir)}]
    names = sorted(e.path.name for e in load_folder(s.instance_dir, 64))  # what training reads: pictures only
    assert names == ["alvan-nee-1.jpeg", "alvan-nee-2.jpeg", "alvan-nee-3.jpeg"]
    assert not (s.instance_dir / "README.md").exists()
    assert "dog photos (3 pictures" in s.why and "diffusers/dog-example" in s.why
    again = subject.choose("sample", "auto", offline_model=False, model=runtime.SD15)
    assert again == s and len(hub.calls) == 1  # kept in the kit cache: no second download


def test_setup_says_which_subject_and_the_class_noun_follows_it(hub, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runtime, "detect", lambda: GPU)
    s = nb.setup("01_dreambooth", instance_dir="sample", class_noun="auto", output_dir=tmp_path / "o")
    assert s.model == runtime.SD15 and not s.small
    assert s.class_noun == "dog" and s.noun("auto") == "dog" and s.noun("toy") == "toy"
    assert s.instance_dir == s.files.instance_dir == subject.dog_dir() and s.subject_why.startswith("Subject: ")
    assert capsys.readouterr().out.count(s.subject_why) == 1  # one line, printed once
    monkeypatch.setattr(runtime, "detect", lambda: runtime.Runtime("local", "cpu", None, 0, 0.0, False))
    off = nb.setup("01_dreambooth", instance_dir="sample", class_noun="auto", output_dir=tmp_path / "p")
    assert off.small and off.class_noun == "star" and off.instance_dir == Path(SAMPLE_INSTANCE_DIR)
    assert off.noun("auto") == "star" and "toy star" in capsys.readouterr().out
    plain = nb.setup("00_start_here", output_dir=tmp_path / "q")  # names no subject: nothing decided or fetched
    assert plain.class_noun == "" and len(hub.calls) == 1


def test_a_class_noun_set_by_hand_is_kept_and_said(hub):
    s = subject.choose("sample", "star", offline_model=False, model=runtime.SD15)
    assert s.kind == "dog" and s.class_noun == "star" and 'the pictures show a dog: CLASS_NOUN = "auto"' in s.why


@pytest.mark.parametrize("error", [hub_errors.OfflineModeIsEnabled("offline mode is enabled"),
                                   hub_errors.LocalEntryNotFoundError("cannot find the requested files"),
                                   ConnectionError("Max retries exceeded")])
def test_hub_failure_stops_with_what_to_do(hub, monkeypatch, error):
    monkeypatch.setattr(hub, "error", error)
    with pytest.raises(DataError) as e:
        subject.choose("sample", "auto", offline_model=False, model=runtime.SD15)
    msg = str(e.value)
    assert f"downloading them failed ({type(error).__name__}: {error}" in msg and "diffusers/dog-example" in msg
    assert "stops here rather than train Stable Diffusion on the offline model's 64 px toy star" in msg
    assert 'INSTANCE_DIR = "my_photos"' in msg and "CLASS_NOUN" in msg and 'MODEL = "offline"' in msg
    assert not (subject.dog_dir() / subject.DONE).exists()  # a failed download is never taken for a done one


def test_no_hub_stops_before_any_download(hub, monkeypatch):
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="(?s)the model hub cannot be reached.*connect to the internet"):
        subject.choose("sample", "auto", offline_model=False, model=runtime.SD15)
    assert hub.calls == []


def test_a_broken_download_is_named_and_fetched_again_later(hub, monkeypatch):
    monkeypatch.setattr(hub, "broken", "alvan-nee-2.jpeg")
    with pytest.raises(DataError, match="(?s)alvan-nee-2.jpeg: cannot be read as an image"):
        subject.choose("sample", "auto", offline_model=False, model=runtime.SD15)
    monkeypatch.setattr(hub, "broken", "")
    assert subject.choose("sample", "auto", offline_model=False).class_noun == "dog" and len(hub.calls) == 2


def test_own_folder_needs_a_class_noun(tmp_path):
    with pytest.raises(ConfigError, match='(?s)CLASS_NOUN = "auto" follows the kit.s sample subject.*"dog", "cat"'):
        subject.choose(tmp_path, "auto", offline_model=True)
    s = subject.choose(tmp_path, "cat", offline_model=False)
    assert s.kind == "own" and s.instance_dir == tmp_path and s.class_noun == "cat" and str(tmp_path) in s.why


# ------------------------------------------------------------------------------------- own photos, offline model

def test_odd_photos_are_read_as_rgb(tmp_path):
    expect = write_odd_photos(tmp_path)
    modes = {n: Image.open(tmp_path / n).mode for n in expect}
    assert modes["cmyk.jpg"] == "CMYK" and modes["gray.png"] == "L" and modes["gray_alpha.png"] == "LA"
    assert modes["palette.png"] == "P" and modes["rgba.png"] == "RGBA" and modes["deep16.png"].startswith("I")
    examples = load_folder(tmp_path, 64)
    assert {e.path.name for e in examples} == set(expect)  # every picture, none of the junk, the non-ASCII name too
    for e in examples:
        want = expect[e.path.name]
        assert e.image.mode == "RGB" and e.image.size == want["size"], e.path.name
        if "white" in want:  # transparency is composited on white
            assert e.image.getpixel(want["white"]) == (255, 255, 255), e.path.name
        if "rgb" in want:
            assert e.image.getpixel(want["rgb"][0]) == want["rgb"][1], e.path.name
    assert NON_ASCII in expect


def test_ordinary_photos_are_unscorable_on_the_offline_model(tmp_path, capsys):
    write_odd_photos(tmp_path, huge=(600, 400))
    with pytest.raises(evaluate.Unscorable, match="show none of the toy world's subjects"):
        evaluate.for_run("offline", tmp_path, "zwx", "dog")
    assert evaluate.for_run("offline", tmp_path, "zwx", "dog", optional=True) is None
    assert "No scores for this run: the pictures in" in capsys.readouterr().out
    assert isinstance(evaluate.Unscorable("x"), nb.EvaluatorUnavailable)  # notebooks' except clauses catch it


def test_own_photos_train_unscored_on_the_offline_model(cfg, parts, tmp_path, capsys):
    photos = tmp_path / "my photos"
    write_odd_photos(photos)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / tracking.METRICS_FILE).write_text('[{"step": 1, "tradeoff": 0.9}]')  # an earlier run's, in the same folder
    unet0 = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    run = cfg.replace(instance_dir=str(photos), instance_prompt="a photo of zwx dog", eval_steps=1, eval_seeds=1)
    r = nb.train(run, parts, progress=False)
    printed = capsys.readouterr().out
    assert len(r.losses) == 2 and all(math.isfinite(x) for x in r.losses)
    after = r.parts.unet.state_dict()
    assert sum(not torch.equal(v, after[k]) for k, v in unet0.items()) > 0.9 * len(unet0)  # it trained
    assert printed.count("This run is not scored: the pictures in") == 1  # said once, with why
    assert "show none of the toy world's subjects" in printed and "trains all the same" in printed
    assert r.metrics == [] and r.best is None  # decided: unscored, no best model kept by loss
    assert not (out / tracking.METRICS_FILE).exists() and not (out / tracking.BEST_DIR).exists()
    assert (Path(r.saved) / "unet").is_dir()  # the trained model is there


def test_an_sdxl_notebook_on_a_gpu_with_the_hub_gets_sdxl_base_and_the_dog_photos(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "detect", lambda: GPU)
    s = nb.setup("08_sdxl_lora", family="sdxl", instance_dir="sample", class_noun="auto", output_dir=tmp_path / "o",
                 resolution=1024)
    assert s.model == runtime.SDXL_BASE and not s.small and s.resolution == 1024 and s.family == "sdxl"
    assert s.class_noun == "dog" and s.instance_dir == subject.dog_dir() and len(hub.calls) == 1
    assert s.contexts("zwx dog")[0] == "a photo of zwx dog on the beach"
