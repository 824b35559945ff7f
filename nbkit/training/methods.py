"""A method is which parameters train and how the result is saved; the training loop is the same for all.

- dreambooth: the UNet (and, optionally, the text encoder) train; the result is a whole diffusers folder.
- lora: small peft adapters on the UNet's attention (and optionally the text encoder) train; the result is a
  LoRA file in the diffusers format (`pipe.load_lora_weights`); nbkit.export.formats also writes kohya/webui keys.
- textual_inversion: only the new token's embedding vector(s) train; every other embedding is put back after
  each step; the result is `learned_embeds.safetensors` (`pipe.load_textual_inversion`); nbkit.export.formats also
  writes the AUTOMATIC1111 format.
Prior preservation is a loss term, not a method: the loop adds it for any method when the config asks.
"The text encoder" is every text encoder of the model (`parts.text_encoders`: SDXL has two); the architecture's
other differences (pooled embeddings, size conditioning, the VAE's precision) live in the parts, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nbkit.config import TrainConfig
from nbkit.models.parts import SDParts

LORA_TARGETS_UNET = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as diffusers' LoRA script
LORA_TARGETS_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Method:
    name: str
    trains_unet: bool  # the UNet's own weights or adapters get gradients
    trains_text_encoder: bool  # the text encoder runs with gradients every step
    params: list[torch.nn.Parameter]
    save: Callable[[SDParts, Path], Path]  # writes the result, returns its path
    after_step: Callable[[], None] = lambda: None  # called after every optimizer update
    full_precision: tuple[str, ...] = ()  # modules kept whole in fp32 (else: frozen weights in fp16 on a GPU)
    extra: dict = field(default_factory=dict)

    def trainable_modules(self, parts: SDParts) -> dict[str, torch.nn.Module]:
        mods = {}
        if self.trains_unet:
            mods["unet"] = parts.unet
        if self.trains_text_encoder:
            mods.update(parts.text_encoders)
        return mods


def frozen_networks(cfg: TrainConfig) -> tuple[str, ...]:
    """The networks whose own weights no step changes (LoRA's adapters are new parameters on a frozen base), which a
    GPU run may therefore load in half precision: half the host memory while loading (SDXL's UNet: 5.1 instead of
    10.3 GB, what lets a free Colab's ~12 GB of RAM load it). The VAE is always loaded in fp32 (SDXL's overflows
    in fp16; the parts decide where it runs)."""
    encoders = ("text_encoder", "text_encoder_2")
    if cfg.method == "lora":
        return ("unet", *encoders)
    if cfg.method == "textual_inversion":
        return ("unet",)  # the text encoder stays whole in fp32 (its embedding rows train)
    return () if cfg.train_text_encoder else encoders


def setup(cfg: TrainConfig, parts: SDParts) -> Method:
    """Freeze everything, then make trainable what the method trains; return the Method."""
    for m in parts.networks.values():
        m.requires_grad_(False)
    return {"dreambooth": _dreambooth, "lora": _lora, "textual_inversion": _textual_inversion}[cfg.method](cfg, parts)


def _dreambooth(cfg: TrainConfig, parts: SDParts) -> Method:
    parts.unet.requires_grad_(True)
    params = list(parts.unet.parameters())
    if cfg.train_text_encoder:
        for te in parts.text_encoders.values():
            te.requires_grad_(True)
            params += list(te.parameters())

    def save(p: SDParts, out: Path) -> Path:
        from nbkit.export.formats import diffusers_folder

        # saved with the sampling scheduler the run used (DDIM by default: the course's pick for fine-tuned models)
        return diffusers_folder(p, out, cfg.save_dtype, scheduler=cfg.sample_scheduler)

    return Method("dreambooth", True, cfg.train_text_encoder, params, save)


def _lora(cfg: TrainConfig, parts: SDParts) -> Method:
    from peft import LoraConfig

    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
    parts.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                      target_modules=LORA_TARGETS_UNET))
    if cfg.lora_text_encoder:
        for te in parts.text_encoders.values():
            te.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                      target_modules=LORA_TARGETS_TEXT))
    params = [p for n, m in parts.networks.items() if n != "vae" for p in m.parameters() if p.requires_grad]

    def save(p: SDParts, out: Path) -> Path:
        from nbkit.export.formats import lora_diffusers

        return lora_diffusers(p, out, cfg.save_dtype)  # rank and alpha go into the file's metadata

    return Method("lora", True, cfg.lora_text_encoder, params, save, extra={"alpha": alpha})


def ti_tokens(cfg: TrainConfig) -> list[str]:
    """The tokens of a (multi-vector) placeholder, named as diffusers' loader names them."""
    return [cfg.placeholder_token] + [f"{cfg.placeholder_token}_{i}" for i in range(1, cfg.num_vectors)]


def _textual_inversion(cfg: TrainConfig, parts: SDParts) -> Method:
    if len(parts.text_encoders) > 1:
        raise ValueError(f"textual_inversion on a model with {len(parts.text_encoders)} text encoders "
                         f"({parts.architecture}) is not supported here: it needs an embedding per encoder. Use "
                         "method='lora' (or 'dreambooth') for this model, or textual inversion on SD 1.5.")
    tok, te = parts.tokenizer, parts.text_encoder
    tokens = ti_tokens(cfg)
    if tok.add_tokens(tokens) != len(tokens):
        raise ValueError(f"The tokenizer already has {cfg.placeholder_token!r}: choose a different placeholder_token.")
    init_ids = tok.encode(cfg.initializer_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"initializer_token {cfg.initializer_token!r} is {len(init_ids)} tokens for this tokenizer; "
                         "choose a word that is a single token (e.g. 'dog', 'toy', 'star').")
    te.resize_token_embeddings(len(tok), mean_resizing=False)  # rows are set just below
    ids = tok.convert_tokens_to_ids(tokens)
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[ids] = emb[init_ids[0]].clone()
    emb.requires_grad_(True)
    original = emb.detach().clone()
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[ids] = False

    home = {}  # the original rows where the embedding trains: copied there once, not host -> GPU every step

    def after_step():  # only the new vectors may move: put every other row back (weight decay touches them all)
        w = te.get_input_embeddings().weight
        key = (w.device, w.dtype)
        if key not in home:
            home.clear()
            home[key] = (original[keep].to(w.device, w.dtype), keep.to(w.device))
        rows, mask = home[key]
        with torch.no_grad():
            w[mask] = rows

    def save(p: SDParts, out: Path) -> Path:
        from nbkit.export.formats import ti_diffusers

        return ti_diffusers(p, cfg.placeholder_token, out)  # {placeholder: [num_vectors, dim]}, fp32

    # The text encoder stays fp32 as in diffusers' TI script: the embedding's gradient flows through all of it
    # (and CPU autocast, which the T4 rehearsal uses, cannot mix fp32 activations with fp16 layer norms).
    return Method("textual_inversion", False, True, [emb], save, after_step, full_precision=("text_encoder",),
                  extra={"token_ids": ids, "original_embeddings": original})
