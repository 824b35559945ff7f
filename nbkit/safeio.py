"""Tensors to and from disk, safely.

- Everything the kit writes is safetensors (no pickle: loading it can never run code), written to a temporary
  name and renamed, so a file that exists is a whole file.
- Large state is written in shards (`save_sharded`), so a 10 GB optimizer state never needs 10 GB of RAM.
- Training state that is not a flat dict of tensors (an optimizer's state, an EMA) goes through `save_tree` /
  `load_tree`: its tensors into safetensors, its structure (numbers, strings, int keys, tuples) into the file's
  JSON metadata.
- A pickled file that the kit reads (`.bin`, `.pt` embeddings, `.ckpt`) goes through
  `torch.load(..., weights_only=True)`: tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class UnsafeFile(ValueError):
    """A pickled file holds more than tensors; the kit refuses to unpickle it."""


def fsync_write(path: Path, data: bytes) -> None:
    """Write bytes and make sure they reached the disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (temporary name, fsync, rename); tensors may live on any device."""
    from safetensors.torch import save

    path = Path(path)
    cpu, storages = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in storages:  # views of one storage (safetensors refuses them): each its own copy
            v = v.clone()
        storages.add(ptr)
        cpu[k] = v
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fsync_write(tmp, save(cpu, metadata=metadata))
    os.replace(tmp, path)
    return path


def save_sharded(tensors: Iterable[tuple[str, torch.Tensor]], folder: str | Path, prefix: str,
                 max_shard_bytes: int = 1 << 30) -> list[str]:
    """Write (name, tensor) pairs as `prefix-00001.safetensors`, ... of at most ~max_shard_bytes each.

    Only one shard is ever copied to CPU memory at a time. Returns the file names written (possibly none).
    """
    folder = Path(folder)
    names, shard, size = [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            names.append(f"{prefix}-{len(names) + 1:05d}.safetensors")
            save_tensors(shard, folder / names[-1])
        shard, size = {}, 0

    for key, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[key] = t
        size += nbytes
    flush()
    return names


def load_sharded(folder: str | Path, names: Iterable[str],
                 device_of: Callable[[str], str | torch.device] = lambda key: "cpu") -> dict[str, torch.Tensor]:
    """Read shards written by save_sharded into one dict, each tensor moved to `device_of(name)` as it is read."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for name in names:
        with safe_open(str(Path(folder) / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key).to(device_of(key))
    return out


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """Read a weights file: safetensors directly; a pickle (.bin/.pt/.ckpt) only with weights_only=True.

    Raises UnsafeFile (saying what to do) when a pickle holds anything but tensors and plain containers.
    """
    path = Path(path)
    if path.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler's refusal comes as several exception types
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise UnsafeFile(
                f"{path.name} is a pickle that holds more than tensors, so loading it could run code; the kit does "
                "not load such files. Get a .safetensors version of it, or convert it yourself in a session you "
                "trust."
            ) from err
        raise


def split_tree(obj) -> tuple[dict[str, torch.Tensor], object]:
    """Nested dicts/lists/tuples of tensors and plain values (an optimizer's state_dict, any optimizer's) as
    (tensors by name, a JSON-able skeleton); `join_tree` puts them back together, types and structure exact.

    Each tensor is named by where it sits ("state/0/exp_avg", at any depth); one tensor met twice is stored once
    and comes back as one. A dict whose keys are all strings (none starting with "__") stays a JSON object; any
    other (a torch optimizer's state is keyed by int parameter index, which JSON would turn into strings) becomes
    {"__dict__": [[key, value], ...]} with its keys' types kept; a tuple becomes {"__tuple__": [...]}.
    Raises TypeError, naming where, for anything else (an object that only pickle could store).
    """
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}  # id(tensor) -> its name: the same tensor twice is stored once

    def walk(x, path: str):
        if isinstance(x, torch.Tensor):
            if id(x) not in names:
                name = path or "tensor"
                while name in tensors:  # two paths that read alike ("a/b" as one key, or nested)
                    name += "~"
                names[id(x)], tensors[name] = name, x
            return {"__tensor__": names[id(x)]}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, f"{path}/{k}" if path else k) for k, v in x.items()}
            return {"__dict__": [[_key(k, path), walk(v, f"{path}/{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            items = [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
            return {"__tuple__": items} if isinstance(x, tuple) else items
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"{path or 'the top level'} holds a {type(x).__module__}.{type(x).__name__}, which cannot be "
                        "saved without pickle: only tensors, numbers, strings, None and dicts/lists/tuples of them can.")

    return tensors, walk(obj, "")


def _key(k, path: str):
    """A dict key in the skeleton: a plain value, or a tuple of them."""
    if isinstance(k, tuple):
        return {"__tuple__": [_key(v, path) for v in k]}
    if k is None or isinstance(k, (bool, int, float, str)):
        return k
    raise TypeError(f"{path or 'the top level'} has a dict key of type {type(k).__name__}: only numbers, strings, "
                    "None and tuples of them can be saved as keys.")


def join_tree(skeleton, tensors: Mapping[str, torch.Tensor]):
    """What split_tree took apart: the same structure, types and tensors."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(join_tree(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {_hashable(join_tree(k, tensors)): join_tree(v, tensors) for k, v in skeleton["__dict__"]}
        return {k: join_tree(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tree(v, tensors) for v in skeleton]
    return skeleton


def _hashable(k):
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


def save_tree(obj, path: str | Path) -> Path:
    """Save nested dicts/lists/tuples of tensors and plain values (an optimizer's state_dict, say) as one
    safetensors file, atomically: no pickle, so loading it can never run code."""
    import json

    tensors, skeleton = split_tree(obj)
    return save_tensors(tensors, path, metadata={"nbkit_tree": json.dumps(skeleton)})


def load_tree(path: str | Path, device: str | torch.device = "cpu"):
    """Read what save_tree wrote, with the same structure and types."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        skeleton = json.loads((f.metadata() or {})["nbkit_tree"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return join_tree(skeleton, tensors)
