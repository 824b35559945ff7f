"""Tensors to and from disk, safely.

- Everything the kit writes is safetensors (no pickle: loading it can never run code), written to a temporary
  name and renamed, so a file that exists is a whole file: `atomic_path` / `atomic_write` for every file the kit
  writes (JSON, pictures too), `swap_folder` for a folder (a checkpoint, the best model).
- Large state is written in shards (`save_sharded`), so a 10 GB optimizer state never needs 10 GB of RAM.
- Training state that is not a flat dict of tensors (an optimizer's state, an EMA) goes through `save_tree` /
  `load_tree`: its tensors into safetensors, its structure (numbers, strings, int keys, tuples) into the file's
  JSON metadata.
- A file too big to build in memory (an fp16 copy of a 3.4 GB UNet) is streamed: `save_streaming` writes the
  header, then one tensor at a time.
- A pickled file that the kit reads (`.bin`, `.pt` embeddings, `.ckpt`) goes through
  `torch.load(..., weights_only=True)`: tensors and plain containers only, never arbitrary objects.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

SAFE_SUFFIXES = (".safetensors",)


class UnsafeFile(ValueError):
    """A pickled file holds more than tensors; the kit refuses to unpickle it."""


def fsync_write(path: Path, data: bytes) -> None:
    """Write bytes and make sure they reached the disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name next to `path` to write to (for writers that want a path: PIL's save, a streaming
    writer); when the block ends without an error it is renamed to `path`, else removed. So `path`, when it
    exists, is a whole file: the previous one or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write bytes (or text, as UTF-8) to `path` atomically: a temporary name, fsync, rename."""
    with atomic_path(path) as tmp:
        fsync_write(tmp, data.encode() if isinstance(data, str) else data)
    return Path(path)


def swap_folder(new: Path, final: Path, old: Path) -> None:
    """Make the folder `new` (written completely) the folder `final`, by renames: a previous `final` is moved to
    `old` first and removed last, so a stop at any moment leaves a whole `final` or none (and maybe a stray
    `new` or `old`, which the caller's names let it recognise and remove)."""
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename in it) durable, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    return atomic_write(path, save(cpu, metadata=metadata))


# torch dtype <-> the dtype names of the safetensors header
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def save_streaming(path: str | Path, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                   get: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file one tensor at a time, atomically, never holding the whole file in memory.

    `specs`: {name: (dtype, shape)} of every tensor (the header comes first); `get(name)`: the tensor itself, on
    any device, asked for once per name; its CPU copy is written and let go before the next is asked for. So
    an fp16 file of a GPU model costs one tensor of host memory, not the model's size.
    """
    if sys.byteorder != "little":  # pragma: no cover - every machine the kit runs on
        raise RuntimeError("safetensors files are little-endian; this machine is not.")
    unknown = sorted({str(d) for d, _ in specs.values() if d not in ST_DTYPES})
    if unknown:
        raise TypeError(f"save_streaming cannot write tensors of dtype {', '.join(unknown)}.")
    size = {k: torch.empty((), dtype=d).element_size() for k, (d, _) in specs.items()}
    order = sorted(specs, key=lambda k: (-size[k], k))  # larger elements first: every tensor stays aligned
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        dtype, shape = specs[k]
        end = offset + math.prod(shape) * size[k]
        header[k] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k in order:
            t = get(k).detach()
            if t.dtype != specs[k][0] or tuple(t.shape) != tuple(specs[k][1]):
                raise ValueError(f"{k}: got a {t.dtype} tensor of shape {tuple(t.shape)}, the header says "
                                 f"{specs[k][0]} {tuple(specs[k][1])}.")
            f.write(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def one_file_per_part(folder: Path, dtype: torch.dtype) -> None:
    """Each weights file in `folder` (a set of shards with its `.index.json`, or one file) becomes one file with
    its floating-point tensors in `dtype`, streamed (save_streaming): one tensor in RAM at a time."""
    groups = []  # (the one file, its shards, the index)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        groups.append((folder / index.name.removesuffix(".index.json"), shards, index))
    sharded = {s for _, shards, _ in groups for s in shards}
    groups += [(f, [f.name], None) for f in sorted(folder.glob("*.safetensors")) if f.name not in sharded]
    for target, shards, index in groups:
        _stream_cast([folder / s for s in shards], target, dtype)
        for s in shards:
            if folder / s != target:
                (folder / s).unlink()
        if index is not None:
            index.unlink()


def _stream_cast(sources: list[Path], target: Path, dtype: torch.dtype) -> None:
    """Write the tensors of `sources` into `target`, floating-point ones cast to `dtype`, one at a time (nothing
    is rewritten when `target` is the one source and already in `dtype`)."""
    from safetensors import safe_open

    new = target.with_name(f".{target.name}.new")
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(s), framework="pt")) for s in sources]
        where, specs, changed = {}, {}, len(sources) > 1 or sources[0] != target
        for f in files:
            for k in f.keys():
                sl = f.get_slice(k)
                was = TORCH_DTYPES[sl.get_dtype()]
                specs[k] = (dtype if was.is_floating_point else was, tuple(sl.get_shape()))
                changed |= specs[k][0] != was
                where[k] = f
        if not changed:
            return
        save_streaming(new, specs, lambda k: where[k].get_tensor(k).to(specs[k][0]), files[0].metadata())
    os.replace(new, target)


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
                        "saved without pickle: only tensors, numbers, strings, None and dicts/lists/tuples of them "
                        "can.")

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
    tensors, skeleton = split_tree(obj)
    return save_tensors(tensors, path, metadata={"nbkit_tree": json.dumps(skeleton)})


def load_tree(path: str | Path, device: str | torch.device = "cpu"):
    """Read what save_tree wrote, with the same structure and types."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        skeleton = json.loads((f.metadata() or {})["nbkit_tree"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return join_tree(skeleton, tensors)
