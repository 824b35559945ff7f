"""Take the model home: the formats a fine-tuned model is written in, and the readers that check them.

- **diffusers folder** (`from_pretrained`), with fp16 or fp32 weights: `diffusers_folder`.
- **LoRA**: the diffusers format (`pipe.load_lora_weights`), with the adapter's rank and alpha in the file's
  metadata: `lora_diffusers`; and kohya/webui keys (`lora_unet_…`, `lora_te_…`, one `.alpha` per layer) that
  AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI load: `lora_kohya`. SDXL the same, with its second text encoder
  (`text_encoder_2` in the diffusers file, `lora_te1_…` / `lora_te2_…` in the kohya one).
- **Textual inversion**: the diffusers file (`learned_embeds.safetensors`, `{token: vectors}`): `ti_diffusers`;
  and the AUTOMATIC1111/ComfyUI embedding (`name.safetensors` holding `emb_params`): `ti_a1111`.
  `read_embedding` reads those and the classic A1111 `.pt` layout (`{"string_to_param": {"*": vectors}}`);
  `load_embedding` puts one into a model (diffusers' own `load_textual_inversion`).

The libraries' converters do the key mapping (peft's `get_peft_model_state_dict`, diffusers'
`convert_state_dict_to_diffusers/_peft/_kohya`). Everything is written as safetensors; anything pickled is read
with `torch.load(weights_only=True)`.
Each writer takes the trained model as `SDParts`, a `TrainResult` or a pipeline, and returns the path it wrote.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nbkit.errors import ExportError  # noqa: F401 - nbkit.export.formats.ExportError too
from nbkit.units import format_bytes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
TI_FILE = "learned_embeds.safetensors"  # the name diffusers' load_textual_inversion looks for
_BAD_FILENAME_CHARS = re.compile(r'[<>:"/\\|?*\s]+')  # not allowed in Windows file names (A1111 names by file)


def size_mb(path: str | Path) -> float:
    """Size of a file, or of everything in a folder, in MB (10**6 bytes)."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def human_size(path: str | Path) -> str:
    """A file's or folder's size for people: '3.1 KB', '3.4 MB', '2.1 GB'."""
    return format_bytes(size_mb(path) * 1e6)


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: choose 'fp32' (exact) or 'fp16' (half the size; what GPUs sample in).")
    return DTYPES[dtype]


def _parts(model):
    """SDParts, a TrainResult (its .parts) or a pipeline: anything with unet, text_encoder and tokenizer."""
    model = getattr(model, "parts", model)
    if not all(hasattr(model, a) for a in ("unet", "text_encoder", "tokenizer")):
        raise ExportError(f"expected the trained model (SDParts, TrainResult or a pipeline), got "
                          f"{type(model).__name__}.")
    return model


def _trainable_nets(model) -> dict[str, torch.nn.Module]:
    """The UNet and every text encoder (SDXL: text_encoder_2 too) by name, of parts or a pipeline."""
    parts = _parts(model)
    names = getattr(parts, "text_encoder_names", ("text_encoder", "text_encoder_2"))
    return {"unet": parts.unet, **{n: m for n in names if (m := getattr(parts, n, None)) is not None}}


def _is_sdxl(model) -> bool:
    parts = _parts(model)
    return getattr(parts, "architecture", None) == "sdxl" or getattr(parts, "text_encoder_2", None) is not None


# ---------------------------------------------------------------------------------------------- diffusers folder


def diffusers_folder(model, out: str | Path, dtype: str = "fp32", scheduler: str = "ddim") -> Path:
    """Write a whole diffusers folder (safetensors) that `StableDiffusionPipeline.from_pretrained(out)` loads.

    `dtype="fp16"` halves the size (what a T4 samples in anyway); the written files are cast, the in-memory model
    is left exactly as it was.
    A pipeline is saved with its own scheduler; SDParts/TrainResult with the named sampling scheduler.

    Host memory: the parts are written by `save_pretrained` in shards of SHARD (a model on the GPU is copied
    to host RAM one shard at a time), then each part's shards are streamed, tensor by tensor and cast on the
    way, into one file: never a second copy of the model in RAM (a free Colab has ~12.7 GB; SD 1.5's UNet is
    3.4 GB in fp32).
    """
    from diffusers import DiffusionPipeline

    from nbkit.models.parts import pipeline
    from nbkit.safeio import one_file_per_part

    torch_dtype = _dtype(dtype)
    pipe = model if isinstance(model, DiffusionPipeline) else pipeline(_parts(model), scheduler)
    modules = [getattr(pipe, n) for n in ("unet", "text_encoder", "text_encoder_2", "vae")
               if getattr(pipe, n, None) is not None]
    if any(getattr(m, "peft_config", None) for m in modules):
        raise ExportError("this model carries LoRA adapters: save them with lora_diffusers()/lora_kohya(), or merge "
                          "them first (pipe.fuse_lora(); pipe.unload_lora_weights()) to save a whole model.")
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD)
    # cast the written files, not the model: casting the live modules to fp16 and back would round its weights
    for name in sorted(pipe.components):  # the parts' folders only: files beside them are someone else's
        if (out / name).is_dir():
            one_file_per_part(out / name, torch_dtype)
    return out


SHARD = "200MB"  # save_pretrained's shard size in diffusers_folder (then merged: one file per part)


# ---------------------------------------------------------------------------------------------------------- LoRA


def _lora_modules(model) -> dict[str, torch.nn.Module]:
    found = {n: m for n, m in _trainable_nets(model).items() if getattr(m, "peft_config", None)}
    if not found:
        raise ExportError("this model has no LoRA adapters: train with method='lora' (or load a LoRA with "
                          "pipe.load_lora_weights) before exporting one.")
    return found


def _adapter(module: torch.nn.Module, adapter: str | None) -> str:
    names = list(module.peft_config)
    if adapter is None:
        if len(names) > 1:
            raise ExportError(f"the model has several adapters {names}: pass adapter=<one of them>.")
        return names[0]
    if adapter not in names:
        raise ExportError(f"no adapter {adapter!r} on this model; it has {names}.")
    return adapter


def _te_canonical(sd: dict[str, torch.Tensor], text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Text-encoder keys as every tool expects them (`text_model.encoder...`): transformers 5 dropped that level."""
    if hasattr(text_encoder, "text_model"):
        return sd
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}


def lora_state_dicts(model, adapter: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' weights in peft's layout (`...to_q.lora_A.weight`), per part:
    {"unet": ..., "text_encoder": ..., SDXL's "text_encoder_2": ...}."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name, module in _lora_modules(model).items():
        a = _adapter(module, adapter)
        if module.peft_config[a].use_dora:
            raise ExportError("DoRA adapters are not supported by these exports; train plain LoRA (use_dora=False).")
        sd = get_peft_model_state_dict(module, adapter_name=a, save_embedding_layers=False)
        out[name] = _te_canonical(sd, module) if name.startswith("text_encoder") else sd
    return out


def lora_diffusers(model, out: str | Path, dtype: str = "fp32", adapter: str | None = None,
                   weight_name: str = LORA_FILE) -> Path:
    """Write the LoRA in the diffusers format: `pipe.load_lora_weights(out)` loads it on the base model.

    The adapter's config (rank, alpha, targets) goes into the file's metadata, so a LoRA trained with
    alpha != rank reloads with the same strength. SDXL's is written by StableDiffusionXLPipeline.save_lora_weights,
    with both text encoders' adapters when they trained.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    torch_dtype = _dtype(dtype)
    mods = _lora_modules(model)
    sds = lora_state_dicts(model, adapter)
    layers = {n: {k: v.detach().to("cpu", torch_dtype).contiguous()
                  for k, v in convert_state_dict_to_diffusers(sd).items()}
              for n, sd in sds.items()}
    meta = {n: mods[n].peft_config[_adapter(mods[n], adapter)].to_dict() for n in mods}
    out = Path(out)
    saver = StableDiffusionXLPipeline if _is_sdxl(model) else StableDiffusionPipeline
    saver.save_lora_weights(out, **{f"{n}_lora_layers": v for n, v in layers.items()},
                            **{f"{n}_lora_adapter_metadata": v for n, v in meta.items()},
                            weight_name=weight_name, safe_serialization=True)
    return out / weight_name


def _layer_scalings(module: torch.nn.Module, adapter: str) -> dict[str, float]:
    """peft's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) of every adapted layer, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[adapter]) for name, m in module.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.scaling}


def lora_kohya(model, out: str | Path, dtype: str = "fp16", adapter: str | None = None) -> Path:
    """Write the LoRA with kohya/webui keys, for AUTOMATIC1111, ComfyUI, SD.Next, InvokeAI (and diffusers).

    Keys are `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha` (and `lora_te_...` for the
    text encoder; SDXL's two: `lora_te1_...`, `lora_te2_...`). The UNet's module names are diffusers' (as kohya's
    SD 1.x LoRAs have them); AUTOMATIC1111's and ComfyUI's loaders map those names for SDXL too, and diffusers'
    load_lora_weights reads them back. Those tools scale each layer by `alpha / rank`, so `.alpha` is written as
    peft's scaling times the rank: exactly the trained alpha (also right with rsLoRA). `out`: a `.safetensors` path,
    or a folder (the file is then `lora_kohya.safetensors`). fp16 by default, as these tools ship LoRAs.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    torch_dtype = _dtype(dtype)
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / "lora_kohya.safetensors"
    mods = _lora_modules(model)
    sds = lora_state_dicts(model, adapter)
    sdxl = _is_sdxl(model)
    flat, ranks, alphas = {}, set(), set()
    for name, sd in sds.items():
        scalings = _layer_scalings(mods[name], _adapter(mods[name], adapter))
        if name.startswith("text_encoder") and not hasattr(mods[name], "text_model"):
            scalings = {f"text_model.{k}": v for k, v in scalings.items()}
        kohya = convert_state_dict_to_kohya({f"{name}.{k}": v for k, v in sd.items()})
        for key, value in kohya.items():
            if key.endswith(".alpha"):  # diffusers writes alpha = rank here; write the trained alpha instead
                continue
            if not sdxl:  # SD 1.x/2.x have one text encoder: kohya calls it lora_te_, not lora_te1_ (SDXL: te1, te2)
                key = key.replace("lora_te1_", "lora_te_", 1)
            flat[key] = value.detach().to("cpu", torch_dtype).contiguous()
            if key.endswith(".lora_down.weight"):
                rank = value.shape[0]
                module = _module_of(key, scalings)
                alpha = scalings[module] * rank
                flat[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(alpha, dtype=torch.float32)
                ranks.add(rank)
                alphas.add(round(alpha, 6))
    cross = getattr(_parts(model).unet.config, "cross_attention_dim", 768)
    meta = {  # what kohya's scripts write; webuis show it (ss_network_alpha/dim are informative only)
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(alphas)),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v2" if cross == 1024 else "sd_v1",
        "ss_v2": str(cross == 1024 and not sdxl), "format": "pt",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(out), metadata=meta)
    return out


def _module_of(kohya_key: str, scalings: dict[str, float]) -> str:
    """The peft module name behind a kohya key (kohya replaced its dots with underscores)."""
    stem = kohya_key.split(".")[0]
    for prefix in ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"):
        stem = stem.removeprefix(prefix)
    for name in scalings:
        if name.replace(".", "_") == stem:
            return name
    raise ExportError(f"internal: no adapted layer matches {kohya_key!r}")  # pragma: no cover


def lora_rank_alpha(path: str | Path) -> dict[str, tuple[int, float]]:
    """Per part, (rank, alpha) of a LoRA file in either format (for checking and for the notebooks)."""
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
    from safetensors.torch import load_file

    sd = load_file(str(path))
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in sd):  # kohya
        res = {}
        for prefix, part in (("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
                             ("lora_te2_", "text_encoder_2")):
            downs = [k for k in sd if k.startswith(prefix) and k.endswith(".lora_down.weight")]
            if downs:
                res[part] = (sd[downs[0]].shape[0], float(sd[downs[0].replace(".lora_down.weight", ".alpha")]))
        return res
    meta = _load_sft_state_dict_metadata(str(path)) or {}
    res = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        downs = [v for k, v in sd.items() if k.startswith(part + ".") and ("lora_A" in k or "down" in k)]
        if downs:
            r = downs[0].shape[0]
            res[part] = (r, float(meta.get(f"{part}.lora_alpha", r)))
    return res


# ------------------------------------------------------------------------------------------ textual inversion


def embedding_tokens(tokenizer, token: str) -> list[str]:
    """The tokens of a learned placeholder: `token`, then `token_1`, `token_2`, ... (diffusers' multi-vector names)."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ExportError(f"the tokenizer has no token {token!r}: give the placeholder you trained (e.g. '<zwx>').")
    tokens = [token]
    while f"{token}_{len(tokens)}" in vocab:
        tokens.append(f"{token}_{len(tokens)}")
    return tokens


def embedding(model, token: str) -> torch.Tensor:
    """The learned vectors of `token`, [num_vectors, dim], fp32 on the CPU."""
    parts = _parts(model)
    ids = parts.tokenizer.convert_tokens_to_ids(embedding_tokens(parts.tokenizer, token))
    return parts.text_encoder.get_input_embeddings().weight[ids].detach().to("cpu", torch.float32).contiguous()


def ti_diffusers(model, token: str, out: str | Path) -> Path:
    """Write `{token: vectors}` as `learned_embeds.safetensors` (diffusers: `pipe.load_textual_inversion(out)`).

    `out`: a folder (the file is `learned_embeds.safetensors` in it) or a `.safetensors` path.
    """
    from safetensors.torch import save_file

    out = Path(out)
    path = out if out.suffix == ".safetensors" else out / TI_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: embedding(model, token)}, str(path))
    return path


def a1111_name(token: str) -> str:
    """The file name stem AUTOMATIC1111/ComfyUI will know the embedding by (their prompt word): `<zwx>` -> `zwx`."""
    name = _BAD_FILENAME_CHARS.sub("_", token).strip("_.")
    if not name:
        raise ExportError(f"cannot make a file name from the token {token!r}: pass out='name.safetensors'.")
    return name


def ti_a1111(model, token: str, out: str | Path, step: int = 0, base_model: str | None = None) -> Path:
    """Write the embedding for AUTOMATIC1111 and ComfyUI; they use the file name as the prompt word.

    - `out` ends in `.safetensors` (or is a folder: `<name>.safetensors` in it): `{"emb_params": vectors}`, the
      layout kohya's scripts write and both UIs read (diffusers reads it too, given `token=`).
    The kit writes safetensors only (a pickled `.pt` can carry code); every current A1111/ComfyUI reads these.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix == ".pt":
        raise ValueError(f"{out.name}: the kit writes embeddings as .safetensors only (a pickled .pt can carry code); "
                         "AUTOMATIC1111 and ComfyUI load the .safetensors file. Use a name ending in .safetensors.")
    if out.suffix != ".safetensors":
        out = out / f"{a1111_name(token)}.safetensors"
    vec = embedding(model, token)
    name = out.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": vec}, str(out), metadata={"name": name, "token": token, "step": str(step),
                                                       "sd_checkpoint_name": base_model or ""})
    return out


def read_embedding(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """(token or name, vectors [n, dim]) from a diffusers, A1111 safetensors or A1111 `.pt` embedding file."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / TI_FILE
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            data = {k: f.get_tensor(k) for k in keys}
        if len(data) != 1:
            raise ExportError(f"{path} holds {len(data)} tensors ({keys[:5]}): an embedding file holds one.")
        key, vec = next(iter(data.items()))
        name = meta.get("token") or meta.get("name") or (None if key == "emb_params" else key)
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(data, dict) and "string_to_param" in data:
            vec, name = next(iter(data["string_to_param"].values())), data.get("name")
        elif isinstance(data, dict) and len(data) == 1:
            name, vec = next(iter(data.items()))
        else:
            raise ExportError(f"{path} is not an embedding file (no 'string_to_param', not a single tensor).")
    vec = vec.detach().float()
    return name, vec.unsqueeze(0) if vec.dim() == 1 else vec


def load_embedding(model, path: str | Path, token: str | None = None) -> list[str]:
    """Add a learned embedding (any format above) to the model's tokenizer and text encoder; returns its tokens.

    Uses diffusers' `load_textual_inversion` on a pipeline sharing the model's parts, so the parts (and any run
    that trains them next, e.g. DreamBooth from the embedding) see the new token. A multi-vector embedding
    becomes `token`, `token_1`, ...; prompts written with `token` are expanded by the pipeline
    (`pipe.maybe_convert_prompt`); to train on them, write them expanded (`expand_prompt`).
    """
    from nbkit.models.parts import SDParts, pipeline

    parts = _parts(model)
    token = token or read_embedding(path)[0]
    if not token:
        raise ExportError(f"{path} does not name its token: pass token='<zwx>' (the word to use in prompts).")
    pipe = pipeline(parts) if isinstance(parts, SDParts) else parts
    pipe.load_textual_inversion(str(path), token=token)
    return embedding_tokens(parts.tokenizer, token)


def expand_prompt(prompt: str, tokenizer, token: str) -> str:
    """`"a photo of <zwx>"` -> `"a photo of <zwx> <zwx>_1"` for a two-vector token (what pipelines do at inference)."""
    return prompt.replace(token, " ".join(embedding_tokens(tokenizer, token)))


# ------------------------------------------------------------------------------------------------------ checks


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a module's weights, to check later that something was (or was not) changed."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def max_weight_diff(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between a module's weights and a snapshot of them (peft-wrapped layers are
    compared through their base weights: `to_q.base_layer.weight` against `to_q.weight`)."""
    now = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}
    missing = set(reference) ^ set(now)
    if missing:
        raise ExportError(f"the weights do not match the snapshot's layout (e.g. {sorted(missing)[:3]}).")
    return max((now[k].detach().float().cpu() - v.float()).abs().max().item() for k, v in reference.items())
