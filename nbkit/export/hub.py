"""The Hugging Face Hub: download the base model once, and share a fine-tuned model with a model card.

Uploading is optional and never fails a run: when you are not logged in (or offline) it says how to log in and
that your files are safe where they are, and returns None.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from nbkit.safeio import atomic_path, atomic_write

# What nbkit.models.parts.load_parts reads from a Stable Diffusion repo (not the 4-8 GB .ckpt files, EMA or fp16
# copies).
SD_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "text_encoder/config.json",
    "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
NOT_LOGGED_IN = (
    "Not uploading: you are not logged in to the Hugging Face Hub. Get a token with *write* access at "
    "https://huggingface.co/settings/tokens, then: on Colab add it as a secret named HF_TOKEN (key icon in the left "
    "bar) or run `from huggingface_hub import notebook_login; notebook_login()`; elsewhere run `hf auth login`. "
    "Nothing is lost: your files are in {folder}."
)
# Settings worth showing on a card (paths on your machine are not).
CARD_SETTINGS = ("method", "max_train_steps", "learning_rate", "lr_scheduler", "train_batch_size",
                 "gradient_accumulation_steps", "resolution", "train_text_encoder", "with_prior_preservation",
                 "class_prompt", "num_class_images", "prior_loss_weight", "lora_rank", "lora_alpha",
                 "placeholder_token", "initializer_token", "num_vectors", "mixed_precision", "use_8bit_adam",
                 "gradient_checkpointing", "seed")
USAGE = {
    "dreambooth": '''from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{repo_id}").to("cuda")
image = pipe("{prompt}", num_inference_steps=50, guidance_scale=7.5).images[0]''',
    "lora": '''from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}").to("cuda")
pipe.load_lora_weights("{repo_id}")
image = pipe("{prompt}", num_inference_steps=50, guidance_scale=7.5).images[0]''',
    "textual_inversion": '''from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}").to("cuda")
pipe.load_textual_inversion("{repo_id}")
image = pipe("{prompt}", num_inference_steps=50, guidance_scale=7.5).images[0]''',
}
# The tags diffusers' own training scripts give (train_dreambooth.py, train_dreambooth_lora.py, textual_inversion.py).
TAGS = {"dreambooth": ["text-to-image", "dreambooth", "diffusers-training", "stable-diffusion",
                       "stable-diffusion-diffusers"],
        "lora": ["text-to-image", "diffusers", "lora", "diffusers-training", "stable-diffusion",
                 "stable-diffusion-diffusers"],
        "textual_inversion": ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers",
                              "textual_inversion", "diffusers-training"]}
TITLES = {"dreambooth": "DreamBooth", "lora": "LoRA DreamBooth", "textual_inversion": "Textual inversion"}
LICENSE = "creativeml-openrail-m"
# What upload_folder leaves out: resumable checkpoints, Jupyter's, and the temporary names of the kit's atomic writes
# (nbkit.safeio: `.name.<pid>.tmp`, `.name.new`; checkpoints' `.tmp-step_*`/`.old-step_*`; best/'s `.best.tmp<pid>`).
UPLOAD_IGNORE = ["checkpoints/", "*/checkpoints/*", ".ipynb_checkpoints/", "*/.ipynb_checkpoints/*", "*.tmp",
                 "*.tmp/*", "*.tmp[0-9]*", "*.old[0-9]*", "*.new", ".tmp-*", "*/.tmp-*", ".old-*", "*/.old-*",
                 "*.partial", "*.incomplete", "__pycache__/", "*/__pycache__/*"]


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def token() -> str | None:
    """The Hub token of this machine (a Colab secret HF_TOKEN, HF_TOKEN, or `hf auth login`), or None."""
    from huggingface_hub import get_token

    return get_token()


def why_not_upload(folder: str | Path) -> str | None:
    """Why nothing can be uploaded from here (offline, not logged in), as the message to print; None: it can."""
    if is_offline():
        return f"Not uploading: the Hub is switched off here (HF_HUB_OFFLINE). Your files are in {folder}."
    if not token():
        return NOT_LOGGED_IN.format(folder=folder)
    return None


def model_card(*, instance_prompt: str, base_model: str, method: str = "dreambooth", settings: dict | None = None,
               repo_id: str = "your-name/your-model", sample_grid: str | None = "samples.png",
               files: list[str] | tuple[str, ...] = (), title: str | None = None) -> str:
    """The model card (README.md with the Hub's YAML header) that diffusers' training scripts write
    (`load_or_create_model_card(from_training=True)` and `populate_model_card`: licence, base model, instance
    prompt, widget, their tags), with its template's TODOs filled in: how to use it, limitations, the training
    settings. A repo that already has a card on the Hub keeps it (diffusers' behaviour), with the tags added."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card

    if method not in USAGE:
        raise ValueError(f"method={method!r}: choose one of {', '.join(USAGE)}.")
    settings = dict(settings or {})
    settings.setdefault("method", method)
    widget = [{"text": instance_prompt, "output": {"url": sample_grid}}] if sample_grid else None
    card = load_or_create_model_card(repo_id, from_training=True, model_description=_description(
        instance_prompt, base_model, method, settings, repo_id, sample_grid, files, title), base_model=base_model,
        prompt=instance_prompt, license=LICENSE, widget=widget, inference=True)
    card = populate_model_card(card, tags=[*TAGS[method], "nbkit"])
    card.data.tags = list(dict.fromkeys(card.data.tags))  # a card loaded from the Hub may have them already
    card.data.pipeline_tag = "text-to-image"
    text = str(card)
    for todo, ours in _filled_todos(instance_prompt, base_model, method, settings, repo_id).items():
        text = text.replace(todo, ours)
    return text


def _description(instance_prompt, base_model, method, settings, repo_id, sample_grid, files, title) -> str:
    """The card's own part (diffusers' `model_description`): what it is, the prompt, the samples, the files."""
    what = {"dreambooth": "a DreamBooth fine-tune", "lora": "LoRA adapters", "textual_inversion":
            "a textual-inversion embedding"}[method]
    lines = [f"# {title or TITLES[method] + ' - ' + repo_id}", "",
             f"{what[0].upper() + what[1:]} of [{base_model}](https://huggingface.co/{base_model}), trained with "
             "nbkit (a Stable Diffusion fine-tuning course kit).", ""]
    if method == "dreambooth":
        lines += [f"DreamBooth for the text encoder was enabled: {bool(settings.get('train_text_encoder'))}.", ""]
    lines += ["## Instance prompt", "", f"The subject is called up with **`{instance_prompt}`**; put it in any prompt, "
              f"e.g. `{instance_prompt} on the beach`.", ""]
    if sample_grid:
        lines += ["## Samples", "", f"![samples]({sample_grid})", ""]
    if files:
        lines += ["## Files", ""] + [f"- `{f}`" + _file_note(f) for f in files] + [""]
    return "\n".join(lines)


def _filled_todos(instance_prompt, base_model, method, settings, repo_id) -> dict[str, str]:
    """diffusers' training-card template's TODO lines -> what the kit knows."""
    skip = set()  # settings of the other methods, and of prior preservation when it was off, say nothing
    if method != "lora":
        skip |= {"lora_rank", "lora_alpha"}
    if method != "textual_inversion":
        skip |= {"placeholder_token", "initializer_token", "num_vectors"}
    if not settings.get("with_prior_preservation"):
        skip |= {"class_prompt", "num_class_images", "prior_loss_weight"}
    shown = {k: settings[k] for k in CARD_SETTINGS if k in settings and k not in skip and settings[k] not in (None, "")}
    table = ["Trained with nbkit on a few photos of the subject. Settings:", "", "| setting | value |", "|---|---|"]
    table += [f"| {k} | `{v if isinstance(v, str) else json.dumps(v)}` |" for k, v in shown.items()]
    return {
        "# TODO: add an example code snippet for running this diffusion pipeline":
            USAGE[method].format(repo_id=repo_id, base_model=base_model, prompt=instance_prompt),
        "[TODO: provide examples of latent issues and potential remediations]":
            "Fine-tuned on a handful of pictures, the model can overfit (every picture looks like the training "
            "photos) and drift (the plain class prompt draws the subject). The weights inherit the CreativeML Open "
            "RAIL-M licence of Stable Diffusion. Only train on people who agreed to it; never use this model to "
            "impersonate or harm anyone.",
        "[TODO: describe the data used to train the model]": "\n".join(table),
    }


def _file_note(name: str) -> str:
    if name.endswith(".safetensors") and "lora" in name.lower():
        return ": LoRA weights"
    if name.endswith(".safetensors") and "/" not in name:
        return ": single-file checkpoint (AUTOMATIC1111 `models/Stable-diffusion`, ComfyUI `models/checkpoints`)"
    return ""


def card_for_run(result, base_model: str | None = None, **kw) -> str:
    """model_card() from a TrainResult (its config gives the method, the prompt and the settings)."""
    cfg = result.config
    return model_card(instance_prompt=cfg.instance_prompt, base_model=base_model or cfg.model, method=cfg.method,
                      settings=cfg.to_dict(), **kw)


def push_to_hub(folder: str | Path, repo_id: str, card: str | Callable[[str], str], sample_grid=None,
                private: bool = True, commit_message: str = "Upload fine-tuned model (nbkit)") -> str | None:
    """Upload `folder` to the Hub model repo `repo_id` (created, private by default) with `card` as its README.md
    and `sample_grid` (a PIL image or a path) as samples.png; checkpoints and temporary files stay out
    (UPLOAD_IGNORE). `card` may be a function of the full repo id (`user/name`), called only when uploading.
    Returns the repo URL, or None with a message when not logged in or offline."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the folder to upload (e.g. the saved model).")
    why = why_not_upload(folder)
    if why:
        print(why)
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token())
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    atomic_write(folder / "README.md", card(repo_id) if callable(card) else card)
    if sample_grid is not None:
        if isinstance(sample_grid, (str, Path)):
            from PIL import Image

            sample_grid = Image.open(sample_grid)
        with atomic_path(folder / "samples.png") as tmp:
            sample_grid.save(tmp, format="PNG")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model",
                      ignore_patterns=UPLOAD_IGNORE)
    url = f"https://huggingface.co/{repo_id}"
    print(f"Uploaded {folder} to {url} ({'private' if private else 'public'}).")
    return url


def prefetch(model: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path | None:
    """Download the files of a Stable Diffusion repo that the notebooks load, once, into the Hub cache; later
    `from_pretrained` calls read them from there. Returns the snapshot folder, or None (local model / offline)."""
    if model in ("offline", "") or Path(model).is_dir():
        print(f"{model!r} is a local model: nothing to download.")
        return None
    if is_offline():
        print(f"Offline (HF_HUB_OFFLINE): not downloading {model}.")
        return None
    from huggingface_hub import snapshot_download

    t = time.perf_counter()
    path = Path(snapshot_download(model, revision=revision, allow_patterns=SD_FILES, cache_dir=cache_dir))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30
    print(f"{model}: {size:.1f} GB in the cache at {path} ({time.perf_counter() - t:.0f} s). "
          "The notebooks load it from there without downloading again.")
    return path
