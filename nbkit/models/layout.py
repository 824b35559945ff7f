"""Folders that load everywhere: what the kit writes loads under transformers 4.x too, not only the 5.x it runs.

Two things differ between the lines, and both are fixed when the kit saves a model:

- **Weights.** transformers >= 5.6 holds CLIPTextModel without its `text_model.` level, and saves a model it did not
  load from the Hub's layout (one built from a config, or loaded from a file written that way) without it too;
  transformers 4.x (and 5.0-5.5) then load that file with every weight "missing" (random). `to_hub_layout(part)`
  renames a saved text encoder's keys to the Hub's (4.x) layout, tensors untouched, streamed one at a time. The
  layouts are recorded per class in HUB_LAYOUT (CLIPTextModel; CLIPTextModelWithProjection, SDXL's second
  encoder): transformers' own conversion table cannot be reused for this, as it prefixes the encoder inside
  CLIPTextModelWithProjection twice when applied to a model that was not loaded through it.
- **Tokenizer.** transformers 5 saves a tokenizer as `tokenizer.json` alone; 4.x's `CLIPTokenizer` (the class a
  pipeline's `model_index.json` names) reads `vocab.json` and `merges.txt`. `legacy_tokenizer_files(folder)`
  writes them (and `added_tokens.json`, for a textual-inversion token) from `tokenizer.json`.

`save_pipeline(pipe, folder)` does both after diffusers' `save_pretrained`; `layout_problems(folder)` is the check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The Hub's (transformers 4.x) key layout of the text encoders the kit writes: (the level every weight sits under,
# top-level names that sit beside it). tests/data/transformers4_text_encoder_keys.json: the keys 4.57 has.
HUB_LAYOUT = {"CLIPTextModel": ("text_model.", ()),
              "CLIPTextModelWithProjection": ("text_model.", ("text_projection.",))}
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # what transformers 4.x's (slow) CLIPTokenizer reads


def _arch(part: Path) -> str | None:
    config = part / "config.json"
    return (json.loads(config.read_text()).get("architectures") or [None])[0] if config.is_file() else None


def hub_key(arch: str, key: str) -> str:
    """A text encoder's weight name in the Hub's layout (unchanged when it is already)."""
    level, beside = HUB_LAYOUT[arch]
    return key if key.startswith((level, *beside)) else level + key


def to_hub_layout(part: str | Path) -> bool:
    """Rename the weights of a saved text-encoder folder (one file or shards with their index) to the Hub's layout,
    in place. Returns whether anything changed; a class without a recorded layout is left as it is."""
    from safetensors import safe_open

    from nbkit.safeio import TORCH_DTYPES, save_streaming

    part = Path(part)
    arch = _arch(part)
    if arch not in HUB_LAYOUT:
        return False
    changed = False
    for file in sorted(part.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            names = {k: hub_key(arch, k) for k in f.keys()}
            if all(k == v for k, v in names.items()):
                continue
            specs = {new: (TORCH_DTYPES[f.get_slice(old).get_dtype()], tuple(f.get_slice(old).get_shape()))
                     for old, new in names.items()}
            old_of = {new: old for old, new in names.items()}
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            save_streaming(tmp, specs, lambda k: f.get_tensor(old_of[k]), f.metadata())
        os.replace(tmp, file)
        changed = True
    for index in part.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        data["weight_map"] = {hub_key(arch, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    return changed


def legacy_tokenizer_files(folder: str | Path) -> list[Path]:
    """Write `vocab.json`, `merges.txt` and (when tokens were added) `added_tokens.json` beside a BPE tokenizer's
    `tokenizer.json`, so transformers 4.x's CLIPTokenizer loads the folder too. Returns the files written."""
    folder = Path(folder)
    spec = folder / "tokenizer.json"
    if not spec.is_file():
        return []
    data = json.loads(spec.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        return []
    vocab = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t["content"] not in vocab}
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges)}
    if added:
        files["added_tokens.json"] = json.dumps(added, ensure_ascii=False)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return [folder / name for name in files]


def save_pipeline(pipe, folder: str | Path, **kw) -> Path:
    """`pipe.save_pretrained(folder, safe_serialization=True, **kw)` with the text encoders in the Hub's layout and
    tokenizers that transformers 4.x reads too."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True, **kw)
    for name in pipe.components:
        if name.startswith("text_encoder") and (folder / name).is_dir():
            to_hub_layout(folder / name)
        if name.startswith("tokenizer") and (folder / name).is_dir():
            legacy_tokenizer_files(folder / name)
    return folder


def weight_keys(folder: Path) -> list[str]:
    """The tensor names of a part's safetensors file(s)."""
    from safetensors import safe_open

    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys += list(st.keys())
    return keys


def layout_problems(folder: str | Path) -> list[str]:
    """What in a pipeline folder transformers 4.x would not read as written (empty: nothing): text-encoder keys
    outside the Hub's layout, a tokenizer without its 4.x files."""
    folder = Path(folder)
    problems = []
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        arch = _arch(part)
        if part.name.startswith("text_encoder") and arch:
            if arch not in HUB_LAYOUT:
                problems.append(f"{part.name}: {arch} has no recorded 4.x layout (nbkit.models.layout.HUB_LAYOUT)")
                continue
            off = [k for k in weight_keys(part) if hub_key(arch, k) != k]
            if off:
                problems.append(f"{part.name}: {len(off)} keys outside the 4.x layout, e.g. {off[0]!r}")
        if part.name.startswith("tokenizer") and (part / "tokenizer.json").is_file():
            missing = [n for n in TOKENIZER_FILES if not (part / n).is_file()]
            if missing:
                problems.append(f"{part.name}: no {', '.join(missing)} (transformers 4.x's CLIPTokenizer reads them)")
    return problems
