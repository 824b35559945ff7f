"""Tensors to and from disk, safely.

- Everything the kit writes is safetensors (no pickle: loading it can never run code), written to a temporary
  name and renamed, so a file that exists is a whole file.
- Large state is written in shards (`save_sharded`), so a 10 GB optimizer state never needs 10 GB of RAM.
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
