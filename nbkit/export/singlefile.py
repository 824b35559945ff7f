"""One `.safetensors` file in the original Stable Diffusion layout: what AUTOMATIC1111, ComfyUI and InvokeAI load.

diffusers keeps a model as a folder of parts (`unet/`, `vae/`, `text_encoder/`, ...); the original CompVis code,
and the web UIs built on it, keep one file whose keys say where each weight lives in *that* code base:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.*` (text encoder).
This module renames the keys (the mapping of diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py`,
computed from each part's config rather than hard-coded for SD 1.5's four blocks, so the kit's small offline model
converts with the very same code), reshapes the VAE attention weights back to 1x1 convolutions, and writes the file.

The opposite direction is diffusers' own: `StableDiffusionPipeline.from_single_file(path, config=folder)`, which is
how `load_single_file` reads a checkpoint back (offline when `config` is a local diffusers folder).

A UNet with LoRA adapters (peft) is exported with the adapters merged in; a text encoder with textual-inversion
tokens is refused (the web UIs expect the base vocabulary: export the embedding itself instead).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nbkit.errors import ExportError  # noqa: F401 - nbkit.export.singlefile.ExportError too

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 (transformers' CLIPTextModel layout)
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14

# Inside a ResNet block: diffusers name -> original name (the leading part of the rest of the key).
UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
               ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]
VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                 ("to_out.0.", "proj_out.")]

Rule = tuple[str, str, list]  # (diffusers prefix, original prefix, renames inside)


def _layers(config) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise ExportError(f"layers_per_block={lpb}: the original layout needs the same number in every block.")
        lpb = lpb[0]
    return lpb


def unet_rules(config, keys) -> list[Rule]:
    """Prefix renames for a UNet2DConditionModel with `config` (SD 1.x/2.x family; any depth or width)."""
    n, per = len(config["block_out_channels"]), _layers(config)
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", []), ("time_embedding.linear_2.", "time_embed.2.", []),
        ("conv_in.", "input_blocks.0.0.", []), ("conv_norm_out.", "out.0.", []), ("conv_out.", "out.2.", []),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", []),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
    ]
    for i in range(n):
        for j in range(per):  # down block i: `per` resnets (+ attentions), then a downsampler except in the last
            k = 1 + i * (per + 1) + j
            rules += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", [])]
        rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.", []))
        for j in range(per + 1):  # up block i: `per + 1` resnets (+ attentions), then an upsampler except in the last
            k = i * (per + 1) + j
            rules += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", [])]
        has_attention = any(key.startswith(f"up_blocks.{i}.attentions.") for key in keys)
        rules.append((f"up_blocks.{i}.upsamplers.0.",
                      f"output_blocks.{i * (per + 1) + per}.{2 if has_attention else 1}.", []))
    return rules


def vae_rules(config) -> list[Rule]:
    """Prefix renames for an AutoencoderKL with `config` (decoder blocks are numbered in reverse in the original)."""
    n, per = len(config["block_out_channels"]), _layers(config)
    rules: list[Rule] = [("quant_conv.", "quant_conv.", []), ("post_quant_conv.", "post_quant_conv.", [])]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in.", []), (f"{part}.conv_out.", f"{part}.conv_out.", []),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", []),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
        rules += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", VAE_RESNET) for j in range(2)]
    for i in range(n):
        rules += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
                  for j in range(per)]
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", []))
        rules += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET)
                  for j in range(per + 1)]
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", []))
    return rules


def _rename(state_dict: dict, rules: list[Rule], prefix: str, part: str) -> dict:
    rules = sorted(rules, key=lambda r: -len(r[0]))  # longest prefix first ("down_blocks.1." before "down_blocks.10.")
    out = {}
    for key, value in state_dict.items():
        for old, new, inner in rules:
            if key.startswith(old):
                rest = key[len(old):]
                for a, b in inner:
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                out[prefix + new + rest] = value
                break
        else:
            raise ExportError(f"{part} weight {key!r} has no place in the original Stable Diffusion layout: only "
                              "SD 1.x/2.x-style models (UNet2DConditionModel, AutoencoderKL, CLIP) can be exported "
                              "as a single file. Save the diffusers folder instead.")
    return out


def unet_to_original(state_dict: dict, config) -> dict:
    """A diffusers UNet state dict in the original layout (keys prefixed `model.diffusion_model.`)."""
    return _rename(state_dict, unet_rules(config, state_dict), UNET_PREFIX, "UNet")


def vae_to_original(state_dict: dict, config) -> dict:
    """A diffusers VAE state dict in the original layout (`first_stage_model.`; attention as 1x1 convolutions)."""
    out = _rename(state_dict, vae_rules(config), VAE_PREFIX, "VAE")
    for key, value in out.items():
        if (".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
                and value.ndim == 2):
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def text_encoder_layout(config) -> str:
    """'clip' (SD 1.x: OpenAI CLIP, quick_gelu) or 'open_clip' (SD 2.x: OpenCLIP ViT-H, gelu)."""
    return "open_clip" if getattr(config, "hidden_act", "quick_gelu") == "gelu" else "clip"


def text_encoder_to_original(state_dict: dict, config, layout: str = "auto") -> dict:
    """A transformers CLIPTextModel state dict in the original layout (SD 1.x CLIP or SD 2.x OpenCLIP)."""
    layout = text_encoder_layout(config) if layout == "auto" else layout
    # transformers >= 5.6 dropped the `text_model.` level of CLIPTextModel; the original layout keeps it.
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
          for k, v in state_dict.items()}
    if layout == "clip":
        out = {CLIP_PREFIX + k: v for k, v in sd.items()}
        ids = CLIP_PREFIX + "text_model.embeddings.position_ids"
        if ids not in out:  # SD 1.x checkpoints carry it; some loaders look for it
            out[ids] = torch.arange(config.max_position_embeddings, dtype=torch.int64)[None]
        return out
    if layout != "open_clip":
        raise ExportError(f"text encoder layout {layout!r}: choose 'auto', 'clip' (SD 1.x) or 'open_clip' (SD 2.x).")
    return _open_clip(sd)


def _open_clip(sd: dict) -> dict:
    """diffusers' SD 2.x text encoder -> OpenCLIP keys; q/k/v projections fused into `in_proj`."""
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    inner = [("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
             ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj.")]
    out, qkv = {}, {}
    layer = "text_model.encoder.layers."
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in top:
            out[OPEN_CLIP_PREFIX + top[k]] = v
        elif k == "text_projection.weight":
            out[OPEN_CLIP_PREFIX + "text_projection"] = v.T.contiguous()
        elif k.startswith(layer):
            idx, rest = k[len(layer):].split(".", 1)
            base = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{idx}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault((base, kind), {})[proj[0]] = v
                continue
            for a, b in inner:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            else:
                raise ExportError(f"text encoder weight {k!r} has no place in the OpenCLIP layout.")
            out[base + rest] = v
        else:
            raise ExportError(f"text encoder weight {k!r} has no place in the OpenCLIP layout.")
    for (base, kind), parts in qkv.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _state_dict(module: torch.nn.Module) -> dict:
    """The module's weights; peft LoRA adapters (if any) merged into a copy of their base weights, dropped otherwise.

    The module itself is left untouched (merging in place and back is not bit-exact).
    """
    sd = module.state_dict()
    if not any(".lora_" in k for k in sd):
        return sd
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {k: v for k, v in sd.items() if ".lora_" not in k}
    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer) and not layer.merged:
            key = f"{name}.base_layer.weight"
            for adapter in layer.active_adapters:
                out[key] = out[key] + layer.get_delta_weight(adapter).to(out[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in out.items()}


def supports(model) -> bool:
    """Whether the model can be written as the single file here: SD 1.x/2.x can, SDXL (two text encoders) not yet."""
    model = getattr(model, "parts", model)
    return getattr(model, "text_encoder_2", None) is None


def _components(model):
    """(unet, vae, text_encoder, tokenizer) of a pipeline, SDParts, TrainResult, or a diffusers folder / hub id."""
    if isinstance(model, (str, Path)):
        from nbkit.models.parts import load_parts

        model = load_parts(str(model))
    model = getattr(model, "parts", model)  # a TrainResult
    if not supports(model):
        raise ExportError("SDXL's single file has another layout (two text encoders under conditioner.embedders, "
                          "its UNet's own blocks), which the kit does not write: take the diffusers folder home "
                          "(formats=['diffusers']; ComfyUI and InvokeAI load those) or train a LoRA (method='lora'), "
                          "whose kohya file AUTOMATIC1111 and ComfyUI load on SDXL base.")
    try:
        return model.unet, model.vae, model.text_encoder, getattr(model, "tokenizer", None)
    except AttributeError as err:
        raise ExportError(f"Expected a pipeline, SDParts, TrainResult or a model folder, got "
                          f"{type(model).__name__}.") from err


def _original(model, text_encoder: str = "auto") -> dict[str, torch.Tensor]:
    """The whole model as one state dict in the original layout: the live tensors themselves, renamed (wherever
    they are, in their own dtype), no copy but for merged LoRA layers and fused/reshaped text-encoder weights."""
    unet, vae, te, tokenizer = _components(model)
    added = [t for t, i in tokenizer.get_added_vocab().items() if i >= tokenizer.vocab_size] if tokenizer else []
    if added:
        raise ExportError(
            f"The tokenizer has {len(added)} added token(s) {added[:3]} from textual "
            "inversion. AUTOMATIC1111 and ComfyUI expect the base vocabulary in a checkpoint: export the embedding "
            "itself (the A1111 embedding format) and use it with the base model's checkpoint."
        )
    sd = {}
    with torch.no_grad():
        sd.update(unet_to_original(_state_dict(unet), unet.config))
        sd.update(vae_to_original(vae.state_dict(), vae.config))
        sd.update(text_encoder_to_original(_state_dict(te), te.config, text_encoder))
    return {k: v.detach() for k, v in sd.items()}


def _stored(v: torch.Tensor, half: bool) -> torch.Tensor:
    """A tensor as the file stores it: fp16 when `half` (cast where it lives: on a GPU, half the transfer)."""
    return v.to(torch.float16) if half and v.is_floating_point() else v


def to_original(model, half: bool = False, text_encoder: str = "auto") -> dict[str, torch.Tensor]:
    """The whole model as one state dict in the original layout (CPU tensors; fp16 when `half`)."""
    return {k: _stored(v, half).to("cpu").contiguous() for k, v in _original(model, text_encoder).items()}


def save_single_file(model, path: str | Path, half: bool = False, text_encoder: str = "auto",
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as one `.safetensors` checkpoint in the original SD layout; returns the path.

    `model`: a pipeline, SDParts, a TrainResult (DreamBooth or LoRA: adapters are merged in) or a diffusers folder.
    `half`: store fp16 weights (half the size: ~2 GB for SD 1.5; what the web UIs use anyway).
    The file is streamed, one tensor at a time (nbkit.safeio.save_streaming): no copy of the model in host RAM.
    """
    from nbkit.safeio import save_streaming

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"{path.name}: name the file *.safetensors (the format the web UIs load safely).")
    sd = _original(model, text_encoder)
    specs = {k: (torch.float16 if half and v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in sd.items()}
    meta = {"format": "pt", "nbkit.layout": "original-stable-diffusion", "nbkit.dtype": "fp16" if half else "fp32"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_streaming(path, specs, lambda k: _stored(sd[k], half), meta)  # atomic: never a half-written checkpoint
    return path


def load_single_file(path: str | Path, config: str | Path, torch_dtype: torch.dtype | None = torch.float32):
    """Read a single-file checkpoint back with diffusers' `StableDiffusionPipeline.from_single_file`.

    `config`: a diffusers folder of the same architecture (the base model's, or the one you exported), which gives
    the parts' configs, the tokenizer and the scheduler without any download.
    """
    from diffusers import StableDiffusionPipeline

    if not Path(config).is_dir():
        raise ExportError(f"config={str(config)!r} is not a folder: give a local diffusers folder of the same "
                          "architecture (e.g. the base model's), so nothing has to be downloaded.")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    torch_dtype=torch_dtype, safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def weight_differences(a, b) -> dict[str, float]:
    """Largest absolute difference between the weights of two models, per part (same architecture expected)."""
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        common = [k for k in sa if k in sb and sa[k].is_floating_point()]
        missing = sorted(set(k for k in sa if sa[k].is_floating_point())
                         ^ set(k for k in sb if sb[k].is_floating_point()))
        if missing:
            raise ExportError(f"{name}: weights present in only one model: {missing[:5]}")
        out[name] = max(float((sa[k].float().cpu() - sb[k].float().cpu()).abs().max()) for k in common)
    return out
