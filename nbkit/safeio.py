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
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
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


def _flatten(obj, tensors: dict[str, torch.Tensor]):
    """A JSON-able skeleton of `obj`; its tensors go into `tensors` under generated keys."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_tree stores tensors, numbers, strings and containers of them, not {type(obj).__name__}")


def _unflatten(skel, tensors: dict[str, torch.Tensor]):
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__tuple__" in skel:
            return tuple(_unflatten(v, tensors) for v in skel["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in skel["__dict__"]}
    if isinstance(skel, list):
        return [_unflatten(v, tensors) for v in skel]
    return skel


def save_tree(obj, path: str | Path) -> Path:
    """Save nested dicts/lists/tuples of tensors and plain values (an optimizer's state_dict, say) as one
    safetensors file, atomically: no pickle, so loading it can never run code."""
    import json

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, tensors)
    return save_tensors(tensors, path, metadata={"nbkit_tree": json.dumps(skeleton)})


def load_tree(path: str | Path, device: str | torch.device = "cpu"):
    """Read what save_tree wrote, with the same structure and types."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        skeleton = json.loads((f.metadata() or {})["nbkit_tree"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unflatten(skeleton, tensors)
