"""Take the model home: write a trained model in the formats that fit its method, reload each file the way its
users will, and check that it draws what the model in memory draws.

| method | files (in one folder, which is also what `push` uploads) |
|---|---|
| DreamBooth | a diffusers folder in fp16 (`from_pretrained`) and one `.safetensors` in the original SD layout \
(AUTOMATIC1111, ComfyUI, InvokeAI) |
| LoRA | `pytorch_lora_weights.safetensors` (diffusers `load_lora_weights`) and `<name>_lora.safetensors` with \
kohya keys (the web UIs) |
| textual inversion | `learned_embeds.safetensors` (diffusers `load_textual_inversion`) and `<word>.safetensors` \
(A1111/ComfyUI embedding) |

The writers are nbkit.export.formats and nbkit.singlefile; this module only chooses, names, reloads and measures.
The check: the same prompt, seed and steps through the reloaded file and through the model in memory, and the mean
and the largest difference of their pixels (0-255). fp16 files differ by rounding only: a few levels at most. On a
GPU the files are reloaded in fp16, so a reloaded embedding is compared at fp16's precision (`vectors_note`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nbkit.export import formats as export
from nbkit.export import singlefile
from nbkit.models.parts import load_parts, pipeline
from nbkit.sample.sampling import generate
from nbkit.units import format_bytes

FORMATS = {  # method -> the formats written by default
    "dreambooth": ("diffusers", "single_file"),
    "lora": ("lora_diffusers", "lora_kohya"),
    "textual_inversion": ("ti_diffusers", "ti_a1111"),
}
WHAT = {
    "diffusers": "diffusers folder: StableDiffusionPipeline.from_pretrained(folder)",
    "single_file": "single file, original SD layout: AUTOMATIC1111 models/Stable-diffusion, ComfyUI models/checkpoints",
    "lora_diffusers": "LoRA for diffusers: pipe.load_lora_weights(folder)",
    "lora_kohya": "LoRA with kohya keys: AUTOMATIC1111 models/Lora, ComfyUI models/loras",
    "ti_diffusers": "embedding for diffusers: pipe.load_textual_inversion(folder)",
    "ti_a1111": "embedding for AUTOMATIC1111 embeddings/ and ComfyUI models/embeddings (the file name is the word)",
}
TOLERANCE = 3.0  # mean pixel difference (0-255) under which a reloaded file draws the same picture (fp16 rounding)


@dataclass
class Exported:
    """One file (or folder) written, and how its reload check went."""

    format: str
    path: Path
    size: str  # human readable, e.g. '1.7 GB'
    seconds: float  # to write it
    mean_pixel_diff: float | None = None  # reloaded vs in memory, same prompt and seed (None: not checked)
    max_pixel_diff: int | None = None
    note: str = ""  # anything else the check found (e.g. the vectors are identical)

    @property
    def ok(self) -> bool | None:
        return None if self.mean_pixel_diff is None else self.mean_pixel_diff <= TOLERANCE

    def line(self) -> str:
        if self.ok is None:
            check = "not reloaded"
        else:
            check = (f"reloaded: {'same picture' if self.ok else 'DIFFERENT picture'} (pixel difference mean "
                     f"{self.mean_pixel_diff:.2f}, max {self.max_pixel_diff})")
        name = self.path.name + ("/" if self.path.is_dir() else "")
        return f"{name:34s} {self.size:>9s}  {check}{'; ' + self.note if self.note else ''}"


def _method(model, method: str | None) -> str:
    method = method or getattr(getattr(model, "config", None), "method", None) or "dreambooth"
    if method not in FORMATS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(FORMATS)}.")
    return method


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reload_dtype() -> torch.dtype:
    """The precision files are reloaded in, as their users will: fp16 on a GPU, fp32 on a CPU."""
    return torch.float16 if _device() == "cuda" else torch.float32


def vectors_note(reloaded: torch.Tensor, trained: torch.Tensor, dtype: torch.dtype) -> str:
    """Whether a reloaded embedding holds the trained vectors, at the precision it was reloaded in (`dtype`): in
    fp16 the trained fp32 vectors come back rounded to fp16 (a relative difference up to half fp16's eps), which
    is the same embedding; anything more is not."""
    a, b = reloaded.detach().float().cpu(), trained.detach().float().cpu()
    if a.shape != b.shape:
        return f"the vectors DIFFER (shape {tuple(a.shape)}, trained {tuple(b.shape)})"
    if torch.equal(a, b):
        return "the same vectors"
    if dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps:
        info = torch.finfo(dtype)
        if torch.allclose(a, b, rtol=info.eps, atol=info.tiny):
            return f"the same vectors (up to {str(dtype).removeprefix('torch.')} rounding)"
    return f"the vectors DIFFER (largest difference {(a - b).abs().max().item():.3g})"


def pixel_difference(a, b) -> tuple[float, int]:
    """Mean and largest absolute difference of two pictures' pixels (0-255): how far two models' same-seed
    pictures are apart."""
    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return float(d.mean()), int(d.max())


def take_home(model, out: str | Path, formats: list[str] | tuple[str, ...] | None = None, *,
              method: str | None = None, base_model: str | None = None, token: str | None = None,
              name: str | None = None, dtype: str = "fp16", check: bool = True, prompt: str | None = None,
              seed: int = 0, steps: int = 20, size: int | None = None, scheduler: str = "ddim",
              reference=None) -> dict[str, Exported]:
    """Write `model` (a TrainResult, or SDParts/pipeline with `method="dreambooth"`) into `out` in `formats`
    (default: the two that fit its method, see FORMATS), reload each and compare one picture with the model in
    memory. Returns {format: Exported}; `report()` prints it.

    `base_model`: what LoRA and embeddings are loaded onto (default: the model the run trained from).
    `dtype`: fp16 (half the size; what GPUs and the web UIs sample in) or fp32, for every format but the
    embeddings (a few KB, always fp32). `check=False` writes without reloading. `reference`: the picture the
    model in memory drew for (`prompt`, `seed`, `steps`, `size`, `scheduler`), if you have it (else it is drawn).
    """
    cfg = getattr(model, "config", None)
    method = _method(model, method)
    # by default the formats of its method this model can be written in (SDXL: no single file yet)
    formats = list(formats or [f for f in FORMATS[method] if f != "single_file" or singlefile.supports(model)])
    unknown = [f for f in formats if f not in WHAT]
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}: choose from {', '.join(WHAT)}.")
    token = token or (cfg.placeholder_token if cfg else None)
    ident = name or export.a1111_name(cfg.identifier if cfg else "model")
    base_model = base_model or (cfg.model if cfg else None)
    prompt = prompt or (cfg.instance_prompt if cfg else "a photo")
    size = size or (cfg.resolution if cfg else None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_disk(model, out, formats, dtype)

    written: dict[str, Exported] = {}
    for fmt in formats:
        t = time.perf_counter()
        path = _write(model, fmt, out, dtype, token, ident, written)
        written[fmt] = Exported(fmt, path, _size(path), time.perf_counter() - t)
    if check:
        ref = reference
        if ref is None:
            trained = model if hasattr(model, "scheduler") else pipeline(export._parts(model), scheduler)
            ref = generate(trained, prompt, seeds=[seed], steps=steps, size=size, scheduler=scheduler)[0]
        base = {}  # LoRA and embeddings go onto one fresh base model, loaded once
        for fmt, item in written.items():
            image, note = _reload_and_draw(fmt, item.path, written, base_model, token, prompt, seed, steps, size,
                                           scheduler, model, base)
            item.mean_pixel_diff, item.max_pixel_diff = pixel_difference(ref, image)
            item.note = note
        del base
        if torch.cuda.is_available():
            from diffusers.training_utils import free_memory

            free_memory()
    return written


def _size(path: Path) -> str:
    """A file's size; a diffusers folder's without the single files that may sit next to its parts."""
    if path.is_file():
        return export.human_size(path)
    return format_bytes(sum(f.stat().st_size for f in path.rglob("*")
                            if f.is_file() and not (f.parent == path and f.suffix == ".safetensors")))


def _write(model, fmt: str, out: Path, dtype: str, token: str | None, ident: str, written: dict) -> Path:
    if fmt == "diffusers":
        return export.diffusers_folder(model, out, dtype=dtype)
    if fmt == "single_file":
        return singlefile.save_single_file(model, out / f"{ident}_dreambooth.safetensors", half=dtype == "fp16")
    if fmt == "lora_diffusers":
        return export.lora_diffusers(model, out, dtype=dtype)
    if fmt == "lora_kohya":
        return export.lora_kohya(model, out / f"{ident}_lora.safetensors", dtype=dtype)
    if not token:
        raise ValueError("an embedding needs its token: pass token='<zwx>' (the placeholder you trained).")
    if fmt == "ti_diffusers":
        return export.ti_diffusers(model, token, out)
    return export.ti_a1111(model, token, out)


def _reload_and_draw(fmt, path, written, base_model, token, prompt, seed, steps, size, scheduler, model, base):
    """Load one written file the way its users do; one picture with the same settings as the reference.
    `base` holds the fresh base model that LoRA and embedding files are loaded onto (and taken off again)."""
    from diffusers import DiffusionPipeline
    from diffusers.training_utils import free_memory

    dtype = _reload_dtype()
    note = ""
    if fmt == "diffusers":  # the folder's own pipeline class (model_index.json): SD's, or SDXL's (no safety checker)
        no_checker = {} if export._is_sdxl(model) else dict(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **no_checker)
    elif fmt == "single_file":
        config = _config_folder(model, written)
        pipe = singlefile.load_single_file(path, config, torch_dtype=dtype)
    else:
        if not base_model:
            raise ValueError(f"{fmt} is loaded onto a base model: pass base_model= (the model the run started from).")
        if "pipe" not in base:
            base["pipe"] = pipeline(load_parts(base_model), scheduler, dtype=dtype if dtype != torch.float32 else None)
        pipe = base["pipe"]
        if fmt.startswith("lora"):
            pipe.load_lora_weights(str(path))
        else:
            pipe.load_textual_inversion(str(path), token=token)
            note = vectors_note(export.embedding(pipe, token), export.embedding(model, token),
                                pipe.text_encoder.get_input_embeddings().weight.dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(_device())
    image = generate(pipe, prompt, seeds=[seed], steps=steps, size=size, scheduler=scheduler)[0]
    if fmt.startswith("lora"):
        pipe.unload_lora_weights()  # the base model again, for the next file
    elif fmt.startswith("ti"):
        pipe.unload_textual_inversion()
    else:
        del pipe
        if torch.cuda.is_available():
            free_memory()  # one reloaded model at a time on a 16 GB GPU
    return image, note


def _config_folder(model, written) -> Path:
    """A local diffusers folder of the same architecture: what from_single_file reads the configs from."""
    if "diffusers" in written:
        return written["diffusers"].path
    for candidate in (getattr(model, "saved", None), getattr(export._parts(model), "source", None)):
        if candidate and Path(candidate).is_dir() and (Path(candidate) / "model_index.json").exists():
            return Path(candidate)
    raise ValueError("reloading a single file needs a local diffusers folder of the model: export 'diffusers' "
                     "too (formats=['diffusers', 'single_file']), or pass check=False.")


def _check_disk(model, out: Path, formats, dtype: str) -> None:
    """Fail before writing gigabytes onto a full disk (or a full Google Drive), with the numbers."""
    parts = export._parts(model)
    nets = parts.networks.values() if hasattr(parts, "networks") else [
        m for n in ("unet", "text_encoder", "text_encoder_2", "vae") if (m := getattr(parts, n, None)) is not None]
    sizes = [sum(p.numel() for p in m.parameters()) for m in nets]
    per = 2 if dtype == "fp16" else 4
    need = sum(sizes) * per if "single_file" in formats else 0
    if "diffusers" in formats:  # save_pretrained writes fp32, then each part is streamed into its final file
        need += sum(sizes) * 4 + max(sizes) * per
    need *= 1.05
    free = shutil.disk_usage(out).free
    if need > free:
        raise OSError(f"exporting {', '.join(formats)} needs ~{format_bytes(need)} but {out} has {format_bytes(free)} "
                      "free: free some space (old outputs, checkpoints) or export fewer formats.")


def report(exported: dict[str, Exported]) -> str:
    """What was written, how big, what it is for, and how its reload check went."""
    lines = []
    for fmt, item in exported.items():
        lines += [item.line(), f"{'':34s} {WHAT[fmt]}"]
    folders = {str(item.path if item.path.is_dir() else item.path.parent) for item in exported.values()}
    lines.append(f"in {', '.join(sorted(folders))}")
    return "\n".join(lines)


def push(exported: dict[str, Exported], repo_id: str, result=None, *, instance_prompt: str | None = None,
         base_model: str | None = None, sample_grid=None, private: bool = True) -> str | None:
    """Upload the export folder to a (private) Hub repo with a model card (nbkit.export.hub): from the run's settings
    when `result` (a TrainResult) is given, else from `instance_prompt` and `base_model`. When not logged in or
    offline: a message that says how to log in, and None. Returns the repo URL."""
    from nbkit.export import hub

    folders = {item.path if item.path.is_dir() else item.path.parent for item in exported.values()}
    if len(folders) != 1:
        raise ValueError(f"the files are in several folders {sorted(map(str, folders))}: export them into one.")
    folder = folders.pop()
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    grid = "samples.png" if sample_grid is not None else None
    if result is not None:
        card = hub.card_for_run(result, repo_id=repo_id, files=files, sample_grid=grid)
    else:
        card = hub.model_card(instance_prompt=instance_prompt or "", base_model=base_model or "unknown",
                              repo_id=repo_id, files=files, sample_grid=grid)
    return hub.push_to_hub(folder, repo_id, card, sample_grid=sample_grid, private=private)
