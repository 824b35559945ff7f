"""Hub helpers without any network: the model card's content, the not-logged-in message, the upload calls (a fake
HfApi), and that the prefetched file list is exactly enough to load a model."""

import fnmatch
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects

from nbkit import safeio
from nbkit.export import hub


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_has_prompt_base_model_settings_and_grid(cfg):
    settings = cfg.replace(max_train_steps=400, learning_rate=2e-6, with_prior_preservation=True,
                           class_prompt="a photo of a dog", class_dir="/secret/path").to_dict()
    card = hub.model_card(instance_prompt="a photo of zwx dog",
                          base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                          settings=settings, repo_id="me/zwx-dog", files=["model.safetensors", "unet/x.safetensors"])
    meta = front_matter(card)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["instance_prompt"] == "a photo of zwx dog" and meta["license"] == "creativeml-openrail-m"
    assert "dreambooth" in meta["tags"] and meta["pipeline_tag"] == "text-to-image"
    assert meta["widget"][0]["output"]["url"] == "samples.png"
    assert "![samples](samples.png)" in card
    assert 'from_pretrained("me/zwx-dog")' in card and "a photo of zwx dog" in card
    assert "| max_train_steps | `400` |" in card and "| learning_rate | `2e-06` |" in card
    assert "| class_prompt | `a photo of a dog` |" in card
    assert "/secret/path" not in card and cfg.instance_dir not in card  # local paths stay private
    assert "AUTOMATIC1111" in card  # the single file is explained
    assert "lora_rank" not in card and "placeholder_token" not in card  # other methods' settings stay out


def test_model_card_is_diffusers_training_card_with_its_todos_filled():
    """The card diffusers' train_dreambooth.py writes (load_or_create_model_card + populate_model_card): its YAML
    fields and tags, its template's sections, and none of its TODO placeholders left."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH
    from huggingface_hub import ModelCard

    card = hub.model_card(instance_prompt="a photo of zwx dog",
                          base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", repo_id="me/zwx-dog",
                          settings={"train_text_encoder": True, "learning_rate": 2e-6})
    data = ModelCard(card).data
    assert data.library_name == "diffusers" and data.license == "creativeml-openrail-m"
    assert data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and data.inference is True
    assert data.instance_prompt == "a photo of zwx dog"
    assert data.widget == [{"text": "a photo of zwx dog", "output": {"url": "samples.png"}}]
    assert data.tags == ["text-to-image", "dreambooth", "diffusers-training", "stable-diffusion",
                         "stable-diffusion-diffusers", "nbkit"]
    template = MODEL_CARD_TEMPLATE_PATH.read_text()
    for heading in ("## Intended uses & limitations", "#### How to use", "#### Limitations and bias",
                    "## Training details"):
        assert heading in template and heading in card  # diffusers' own sections, in its order
    assert card.index("#### How to use") < card.index('from_pretrained("me/zwx-dog")') < card.index("## Training")
    assert "TODO" not in card and "# DreamBooth - me/zwx-dog" in card
    assert "DreamBooth for the text encoder was enabled: True." in card  # as diffusers' card says it
    assert "| learning_rate | `2e-06` |" in card and "CreativeML Open RAIL-M" in card


@pytest.mark.parametrize("method,call", [("lora", "load_lora_weights"),
                                         ("textual_inversion", "load_textual_inversion")])
def test_model_card_usage_per_method(method, call):
    card = hub.model_card(instance_prompt="a photo of <zwx>", base_model="base/model", method=method, sample_grid=None)
    assert f'pipe.{call}("your-name/your-model")' in card and 'from_pretrained("base/model")' in card
    assert "samples.png" not in card and method in front_matter(card)["tags"]


def test_card_for_run_uses_the_runs_config(cfg):
    from types import SimpleNamespace

    card = hub.card_for_run(SimpleNamespace(config=cfg.replace(method="lora", lora_rank=8)), base_model="b/m")
    assert "| lora_rank | `8` |" in card and "load_lora_weights" in card


def test_not_logged_in_says_how_and_uploads_nothing(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: pytest.fail("no Hub call when not logged in"))
    assert hub.push_to_hub(tmp_path, "me/model", card="x") is None
    out = capsys.readouterr().out
    assert "not logged in" in out and "HF_TOKEN" in out and "notebook_login" in out and str(tmp_path) in out
    assert not (tmp_path / "README.md").exists()


def test_offline_uploads_nothing(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.push_to_hub(tmp_path, "me/model", card="x") is None
    assert "HF_HUB_OFFLINE" in capsys.readouterr().out


def test_logged_in_creates_repo_and_uploads_folder_with_card_and_grid(tmp_path, monkeypatch):
    import huggingface_hub
    from PIL import Image

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def whoami(self):
            return {"name": "student"}

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["private"]))

        def upload_folder(self, repo_id, folder_path, **kw):
            files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
            # what huggingface_hub's upload_folder sends, given these ignore_patterns
            calls.append(("upload", repo_id, list(filter_repo_objects(files, ignore_patterns=kw["ignore_patterns"]))))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_text("w")
    # what the kit leaves behind when a run or a write is interrupted, with the kit's own temporary names
    with safeio.atomic_path(tmp_path / "unet" / "config.json") as tmp:
        leftover = tmp.name  # what a write cut short by a stopped runtime leaves
        tmp.write_text("{}")
    (tmp_path / "unet" / leftover).write_text("half")
    (tmp_path / ".model.safetensors.new").write_text("half")  # safeio._stream_cast's
    for folder in ("checkpoints/step_000010", "checkpoints/.tmp-step_000020-7", ".best.tmp7", ".best.old7",
                   ".ipynb_checkpoints", "sub/checkpoints/step_1"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "state.safetensors").write_text("s")
    url = hub.push_to_hub(tmp_path, "zwx-dog", card=lambda repo: f"---\nlicense: x\n---\n# {repo}\n",
                          sample_grid=Image.new("RGB", (8, 8)))
    assert url == "https://huggingface.co/student/zwx-dog"
    assert calls == [("init", "hf_test"), ("create", "student/zwx-dog", True),
                     ("upload", "student/zwx-dog", ["README.md", "model_index.json", "samples.png", "unet/config.json",
                                                    "unet/diffusion_pytorch_model.safetensors"])]
    assert (tmp_path / "README.md").read_text() == "---\nlicense: x\n---\n# student/zwx-dog\n"  # the full repo id


def test_prefetch_file_list_is_enough_to_load_the_model(offline_dir, tmp_path, monkeypatch):
    """Only the files SD_FILES allows, copied out of a model folder, load with load_parts."""
    import huggingface_hub

    import nbkit

    repo = tmp_path / "repo"
    for p in offline_dir.rglob("*"):
        rel = p.relative_to(offline_dir).as_posix()
        if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in hub.SD_FILES):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, repo / rel)
    parts = nbkit.load_parts(str(repo))
    assert parts.unet is not None and len(parts.tokenizer) > 0

    seen = {}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda model, **kw: seen.update(kw, model=model) or str(repo))
    assert hub.prefetch("some/model") == repo
    assert seen["model"] == "some/model" and seen["allow_patterns"] == hub.SD_FILES
    assert not any(p.endswith(".ckpt") or "*" == p for p in hub.SD_FILES)
    assert hub.prefetch("offline") is None
