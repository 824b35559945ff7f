import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from nbkit import ModelNotFound, load_parts, pipeline
from nbkit.models.offline import OFFLINE_SPEC, offline_model_dir


def test_offline_model_is_a_real_diffusers_folder(offline_dir):
    index = json.loads((offline_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(offline_dir)  # the same code path as SD 1.5
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.text_encoder).__name__ == "CLIPTextModel"


def test_offline_build_is_deterministic_and_cached(tmp_path, monkeypatch, offline_dir):
    monkeypatch.setenv("NBKIT_CACHE", str(tmp_path))
    d = offline_model_dir(pretrained=False)  # the random-weights build (used when data/toy-sd is absent)
    assert d.parent == tmp_path and d.name.startswith("offline-sd-")
    from safetensors.torch import load_file

    monkeypatch.setenv("NBKIT_CACHE", str(tmp_path / "again"))
    d2 = offline_model_dir(pretrained=False)
    a = load_file(d / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(d2 / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setenv("NBKIT_CACHE", str(tmp_path))
    assert offline_model_dir(pretrained=False) == d  # second call reuses it


def test_tokenizer_knows_the_course_words(parts):
    tok = parts.tokenizer
    for word in ("zwx", "star", "dog", "photo", "background"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    assert tok.model_max_length == 77
    assert (OFFLINE_SPEC / "tokenizer" / "vocab.json").exists()  # older transformers load it too


def test_load_parts(parts):
    assert parts.prediction_type == "epsilon"
    assert parts.vae_scale_factor == 4  # 64 px pictures, 16x16 latents
    assert type(parts.noise_scheduler).__name__ == "DDPMScheduler"


def test_missing_folder_and_unreachable_id_say_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="MODEL='offline'"):
        load_parts(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFound, match="not a diffusers model folder"):
        load_parts(str(tmp_path / "missing"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="offline"):
        load_parts("nobody/no-such-model")


def test_pipeline_shares_parts(parts):
    pipe = pipeline(parts, "pndm")
    assert pipe.unet is parts.unet and type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_no_network_and_no_such_model_are_told_apart(monkeypatch):
    from nbkit.env import runtime

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: False)  # the cable is out
    with pytest.raises(ModelNotFound) as e:
        load_parts("nobody/no-such-model")  # fails at once from the cache, no retries against a dead network
    assert "no network" in str(e.value) and "MODEL='offline'" in str(e.value)

    from transformers import CLIPTokenizer

    def missing(*a, **k):
        raise OSError("nobody/no-such-model is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", missing)
    with pytest.raises(ModelNotFound) as e:
        load_parts("nobody/no-such-model")
    assert ("no such model" in str(e.value) and "check the spelling" in str(e.value)
            and "MODEL='offline'" in str(e.value))
