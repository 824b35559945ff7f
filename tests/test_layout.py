"""Exports that load everywhere: what the kit writes has the text encoders in the transformers 4.x (Hub) layout and
tokenizers that 4.x reads. Checked two ways: the saved keys against the 4.x layout recorded in tests/data (always),
and a real load in a transformers 4.x venv (when one is there)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from nbkit.export import formats as export
from nbkit.models import layout
from nbkit.models.offline import OFFLINE_SPEC, PRETRAINED_TOY, offline_model_dir

DATA = Path(__file__).parent / "data"
TF4_KEYS = json.loads((DATA / "transformers4_text_encoder_keys.json").read_text())
# A python with transformers 4.x and a diffusers of its time, e.g.:
#   uv venv /tmp/minvenv --python 3.11 && uv pip install --python /tmp/minvenv/bin/python torch==2.13.0 \
#     transformers==4.57.1 diffusers==0.35.0 huggingface_hub==0.34.0 tokenizers==0.22.0 safetensors==0.4.3
TF4_PYTHON = Path(os.environ.get("NBKIT_TRANSFORMERS4_PYTHON", "/tmp/minvenv/bin/python"))
PROMPTS = ["a photo of <zwx> star on a green background", "a photo of a small red star"]


def keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def test_shipped_and_built_models_have_the_4x_layout(offline_dir):
    assert layout.layout_problems(PRETRAINED_TOY) == []  # the shipped toy-sd
    built = offline_model_dir(pretrained=False)  # the spec with seeded random weights, built from configs
    assert layout.layout_problems(built) == []
    assert keys(PRETRAINED_TOY / "text_encoder") == keys(built / "text_encoder") == TF4_KEYS["CLIPTextModel"]
    from nbkit.models.sdxl import TINY_SDXL  # the shipped tiny SDXL: its two encoders

    assert layout.layout_problems(TINY_SDXL) == []
    assert keys(TINY_SDXL / "text_encoder") == TF4_KEYS["CLIPTextModel"]
    assert keys(TINY_SDXL / "text_encoder_2") == TF4_KEYS["CLIPTextModelWithProjection"]
    te = CLIPTextModel.from_pretrained(TINY_SDXL / "text_encoder")  # transformers 5 reads the renamed file, all of it
    assert all(torch.equal(v, load_file(TINY_SDXL / "text_encoder" / "model.safetensors")[layout.hub_key(
        "CLIPTextModel", k)]) for k, v in te.state_dict().items() if "position_ids" not in k)


def test_the_check_names_what_4x_would_not_read(tmp_path):
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(OFFLINE_SPEC / "text_encoder"))
    te.save_pretrained(tmp_path / "text_encoder")  # as transformers writes a model built from a config
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text((OFFLINE_SPEC / "tokenizer" / "tokenizer.json").read_text())
    problems = layout.layout_problems(tmp_path)
    if not hasattr(te, "text_model"):  # transformers >= 5.6: no `text_model.` level of its own
        assert any(p.startswith("text_encoder: 36 keys outside the 4.x layout") for p in problems)
    assert "tokenizer: no vocab.json, merges.txt (transformers 4.x's CLIPTokenizer reads them)" in problems


@pytest.mark.parametrize("cls", [CLIPTextModel, CLIPTextModelWithProjection])
def test_a_fresh_text_encoder_is_saved_in_the_4x_layout(tmp_path, cls):
    """Generic: SD's CLIPTextModel and SDXL's second encoder (with projection) both save the keys 4.x has."""
    te = cls(CLIPTextConfig.from_pretrained(OFFLINE_SPEC / "text_encoder"))
    te.save_pretrained(tmp_path, max_shard_size="20KB")  # shards and their index
    layout.to_hub_layout(tmp_path)
    assert not layout.to_hub_layout(tmp_path)  # once is enough
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(layout.weight_keys(tmp_path)) == TF4_KEYS[cls.__name__]
    index = json.loads(next(tmp_path.glob("*.index.json")).read_text())["weight_map"]
    assert sorted(index) == TF4_KEYS[cls.__name__]
    again = cls.from_pretrained(tmp_path)  # and transformers 5 reads it back, weights identical
    for k, v in te.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_diffusers_folder_export_has_the_4x_layout_and_an_added_token(tmp_path, parts):
    parts.tokenizer.add_tokens(["<zwx>"])  # a textual-inversion token, as DreamBooth from TI exports it
    parts.text_encoder.resize_token_embeddings(len(parts.tokenizer))
    out = export.diffusers_folder(parts, tmp_path / "model", dtype="fp16")
    assert layout.layout_problems(out) == []
    assert keys(out / "text_encoder") == TF4_KEYS["CLIPTextModel"]
    added = json.loads((out / "tokenizer" / "added_tokens.json").read_text())
    assert added == {"<zwx>": len(parts.tokenizer) - 1}
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    assert vocab == {k: v for k, v in parts.tokenizer.get_vocab().items() if k != "<zwx>"}


LOAD_IN_TF4 = """
import json, sys, torch, transformers, diffusers
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
tok, te = pipe.tokenizer, pipe.text_encoder
ids = tok(json.loads(sys.argv[2]), padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
with torch.no_grad():
    emb = te(ids)[0]
torch.save({"ids": ids, "emb": emb, "versions": [transformers.__version__, diffusers.__version__],
            "tokenizer": type(tok).__name__}, sys.argv[3])
"""


@pytest.mark.skipif(not TF4_PYTHON.is_file(), reason=f"no transformers 4.x python at {TF4_PYTHON} (set "
                    "NBKIT_TRANSFORMERS4_PYTHON; how to make one: the comment above TF4_PYTHON in this file). The "
                    "saved-key checks above cover the layout without it.")
def test_transformers4_loads_the_export_with_the_same_text_encoder(tmp_path, parts):
    """A DreamBooth take-home folder written here loads under transformers 4.x + a diffusers of its time, and its
    text encoder gives what the model in memory gives (random 'missing' weights would not)."""
    parts.tokenizer.add_tokens(["<zwx>"])
    parts.text_encoder.resize_token_embeddings(len(parts.tokenizer))
    with torch.no_grad():  # a trained-looking text encoder: not the base weights
        parts.text_encoder.get_input_embeddings().weight[-1] += 0.5
    out = export.diffusers_folder(parts, tmp_path / "model", dtype="fp32")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([str(TF4_PYTHON), "-c", LOAD_IN_TF4, str(out), json.dumps(PROMPTS), str(tmp_path / "o.pt")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    assert got["versions"][0].startswith("4.") and got["tokenizer"] == "CLIPTokenizer"  # the slow 4.x class
    tok = parts.tokenizer
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert torch.equal(got["ids"], ids)  # the added token included
    with torch.no_grad():
        emb = parts.text_encoder(ids)[0]
    assert (got["emb"] - emb).abs().max().item() < 1e-4
