"""The Hugging Face Hub: download the base model once, and share a fine-tuned model with a model card.

Uploading is optional and never fails a run: when you are not logged in (or offline) it says how to log in and
that your files are safe where they are, and returns None.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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
TAGS = {"dreambooth": ["dreambooth"], "lora": ["lora"], "textual_inversion": ["textual_inversion"]}


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def token() -> str | None:
    """The Hub token of this machine (a Colab secret HF_TOKEN, HF_TOKEN, or `hf auth login`), or None."""
    from huggingface_hub import get_token

    return get_token()


def model_card(*, instance_prompt: str, base_model: str, method: str = "dreambooth", settings: dict | None = None,
               repo_id: str = "your-name/your-model", sample_grid: str | None = "samples.png",
               files: list[str] | tuple[str, ...] = (), title: str | None = None) -> str:
    """A model card (README.md with the Hub's YAML header): what it is, the instance prompt, the base model, how to
    use it, the training settings and the sample grid."""
    from huggingface_hub import ModelCardData

    if method not in USAGE:
        raise ValueError(f"method={method!r}: choose one of {', '.join(USAGE)}.")
    settings = dict(settings or {})
    settings.setdefault("method", method)
    data = ModelCardData(
        license="creativeml-openrail-m", base_model=base_model, library_name="diffusers", pipeline_tag="text-to-image",
        tags=["text-to-image", "stable-diffusion", "diffusers", "nbkit", *TAGS[method]],
        instance_prompt=instance_prompt,
        widget=[{"text": instance_prompt, "output": {"url": sample_grid}}] if sample_grid else None,
    )
    kind = {"dreambooth": "a DreamBooth fine-tune", "lora": "LoRA adapters", "textual_inversion":
            "a textual-inversion embedding"}[method]
    lines = [
        "---", data.to_yaml(), "---", "", f"# {title or repo_id.split('/')[-1]}", "",
        f"{kind[0].upper() + kind[1:]} of [{base_model}](https://huggingface.co/{base_model}), trained with nbkit "
        "(a Stable Diffusion fine-tuning course kit).", "",
        "## Instance prompt", "", f"The subject is called up with **`{instance_prompt}`**; put it in any prompt, e.g. "
        f"`{instance_prompt} on the beach`.", "",
    ]
    if sample_grid:
        lines += ["## Samples", "", f"![samples]({sample_grid})", ""]
    lines += ["## How to use", "", "```python",
              USAGE[method].format(repo_id=repo_id, base_model=base_model, prompt=instance_prompt), "```", ""]
    if files:
        lines += ["Files:", ""] + [f"- `{f}`" + _file_note(f) for f in files] + [""]
    skip = set()  # settings of the other methods, and of prior preservation when it was off, say nothing
    if method != "lora":
        skip |= {"lora_rank", "lora_alpha"}
    if method != "textual_inversion":
        skip |= {"placeholder_token", "initializer_token", "num_vectors"}
    if not settings.get("with_prior_preservation"):
        skip |= {"class_prompt", "num_class_images", "prior_loss_weight"}
    shown = {k: settings[k] for k in CARD_SETTINGS if k in settings and k not in skip and settings[k] not in (None, "")}
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v if isinstance(v, str) else json.dumps(v)}` |" for k, v in shown.items()]
    lines += ["", "## Licence and use", "",
              "The weights inherit the CreativeML Open RAIL-M licence of Stable Diffusion. Only train on people who "
              "agreed to it; never use this model to impersonate or harm anyone.", ""]
    return "\n".join(lines)


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


def push_to_hub(folder: str | Path, repo_id: str, card: str, sample_grid=None, private: bool = True,
                commit_message: str = "Upload fine-tuned model (nbkit)") -> str | None:
    """Upload `folder` to the Hub model repo `repo_id` (created, private by default) with `card` as its README.md
    and `sample_grid` (a PIL image or a path) as samples.png. Returns the repo URL, or None with a message when not
    logged in or offline."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the folder to upload (e.g. the saved model).")
    if is_offline():
        print(f"Not uploading: the Hub is switched off here (HF_HUB_OFFLINE). Your files are in {folder}.")
        return None
    tok = token()
    if not tok:
        print(NOT_LOGGED_IN.format(folder=folder))
        return None
    from huggingface_hub import HfApi

    (folder / "README.md").write_text(card)
    if sample_grid is not None:
        if isinstance(sample_grid, (str, Path)):
            from PIL import Image

            sample_grid = Image.open(sample_grid)
        sample_grid.save(folder / "samples.png")
    api = HfApi(token=tok)
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model")
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
