"""Full size, on a CPU, once: one step of DreamBooth + text encoder + prior preservation at 512 px on SD 1.5.

    python benchmarks/fullsize_cpu.py            # SD 1.5 (random weights), 512 px: ~19 min on 2 cores, 14 GiB
    python benchmarks/fullsize_cpu.py --smoke    # the offline model at 64 px, the same code (seconds; tested)

Not CI (too slow there). It proves nothing in the real-size path breaks: SD 1.5 from data/sd15-arch (random
weights) saved in the hub's layout with an fp16 variant and read by `nbkit.load_parts(folder, variant="fp16")`;
`nbkit.train` with class images, the CLIP + DINO scorer (ViT-B/32 = evaluate.CLIP_ID and ViT-S/16, built from
configs into local folders), best/ in fp32, a checkpoint, the fp16 save and the disk checks; then `take_home`: the
fp16 diffusers folder and the ~2 GB single file, each reloaded and drawn.

--mode: both set NBKIT_T4_REHEARSAL=1 (the T4's 8-bit AdamW: weights/optimizer as in the planner's T4 plan). fp32
(default): mixed_precision="no", sampling without autocast. rehearsal: the T4's whole fp16 path, unusable on CPUs
without native fp16 (here a 3x3 convolution is ~600x slower in fp16; a 512 px UNet forward > 7 min vs 18 s fp32).
Per phase: seconds and peak RSS (VmHWM reset via /proc/self/clear_refs; sampled RSS timeline too), then the
planner's terms against tensors counted at the optimizer step. Tables on stdout, JSON + markdown in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import importlib
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

GiB = 2**30
VERSIONS = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes")
PROMPT, CLASS_PROMPT = "a photo of zwx star", "a photo of a star"
_L = lambda h, n, heads, **kw: dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n,  # noqa: E731
                                    num_attention_heads=heads, **kw)
# CLIP text tower, vision tower, projection: ViT-B/32 is evaluate.CLIP_ID; ViT-L/14 is SD 1.5's own CLIP
CLIPS = {"b32": (_L(512, 12, 8), _L(768, 12, 12, patch_size=32), 512),
         "l14": (_L(768, 12, 12), _L(1024, 24, 16, patch_size=14), 768)}
DINO_VITS16 = _L(384, 12, 6, patch_size=16)
STEP_PHASE = "train step (forward, backward, 8-bit AdamW)"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (0 where /proc is not there)."""
    with contextlib.suppress(OSError):
        return next((int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key + ":")), 0)
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        return f.write("5") == 1
    return False


class Recorder:
    """Flat phases, one at a time: seconds and peak RSS of each (VmHWM: anonymous + file-backed pages, e.g. mmap'd
    safetensors), plus RSS and anonymous RSS sampled every `interval` seconds (the timeline; the sampled peak)."""

    def __init__(self, interval: float = 1.0):
        self.segments: list[dict] = []
        self.timeline: list[tuple[float, float, float, str]] = []  # seconds, RSS GiB, anonymous RSS GiB, phase
        self.t0, self.label = time.perf_counter(), None
        self._start, self._sampled, self._anon, self._hwm_ok = 0.0, 0, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            rss, anon, label = _status("VmRSS"), _status("RssAnon"), self.label
            if label == self.label:
                self._sampled, self._anon = max(self._sampled, rss), max(self._anon, anon)
            self.timeline.append((round(time.perf_counter() - self.t0, 2), round(rss / GiB, 3), round(anon / GiB, 3),
                                  label or ""))

    def switch(self, label: str | None) -> None:
        """End the current phase (if any) and start `label` (None: none)."""
        now, rss, anon = time.perf_counter(), _status("VmRSS"), _status("RssAnon")
        if self.label is not None:
            peak = max(_status("VmHWM") if self._hwm_ok else self._sampled, rss)  # HWM exact, samples fallback
            self.segments.append({"phase": self.label, "seconds": now - self._start, "peak_rss_gib": peak / GiB,
                                  "start_rss_gib": self._rss0 / GiB, "end_rss_gib": rss / GiB,
                                  "peak_anon_gib": max(self._anon, anon) / GiB})
            print(f"   [{now - self.t0:7.1f} s] {self.label}: {now - self._start:.1f} s, peak RSS {peak / GiB:.2f} GiB",
                  flush=True)
        self.label, self._start, self._rss0 = label, now, rss
        self._hwm_ok, self._sampled, self._anon = _reset_peak(), rss, anon

    def close(self) -> None:
        self.switch(None), self._stop.set(), self._thread.join()

    def phases(self) -> list[dict]:
        """Segments of the same name summed (seconds) and maxed (peak), in order of first appearance."""
        out: dict[str, dict] = {}
        for s in self.segments:
            o = out.setdefault(s["phase"], dict(s, seconds=0.0))
            o.update(seconds=o["seconds"] + s["seconds"], end_rss_gib=s["end_rss_gib"],
                     **{k: max(o.get(k, 0), s.get(k, 0)) for k in ("peak_rss_gib", "peak_anon_gib")})
        return list(out.values())


def build_model(folder: Path, smoke: bool) -> dict:
    """SD 1.5 with random fp32 weights (smoke: the offline model) saved as the hub keeps it: model_index.json,
    one folder per part, fp32 files and `*.fp16.safetensors` next to them. Returns the files and their sizes."""
    from diffusers import StableDiffusionPipeline

    from nbkit import load_parts
    from nbkit.models import sd15

    parts = load_parts("offline") if smoke else sd15.build_parts("cpu")
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float16)  # in place: the fp32 weights are not needed again
    pipe.save_pretrained(folder, safe_serialization=True, variant="fp16")
    del pipe, parts
    gc.collect()
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*.safetensors"))}


def build_scorers(root: Path, smoke: bool, clip: str) -> tuple[Path, Path]:
    """CLIP and DINO ViT-S/16 from their configs with random weights, saved where from_pretrained reads them."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor, ViTModel
    from transformers import CLIPImageProcessor as CIP

    from nbkit.models import sd15

    tok = sd15.tokenizer()  # CLIP's 49,408 entries
    text, vision, proj = (dict(TINY), dict(TINY, patch_size=8), 16) if smoke else CLIPS[clip]
    dino, px = (dict(TINY, patch_size=8), 32) if smoke else (DINO_VITS16, 224)
    torch.manual_seed(0)
    clip_dir, dino_dir = root / f"clip-{clip}", root / "dino-vits16"
    CLIPModel(CLIPConfig(text_config=dict(text, vocab_size=len(tok), max_position_embeddings=77,
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id),
                         vision_config=dict(vision, image_size=px), projection_dim=proj)).save_pretrained(clip_dir)
    CLIPProcessor(CIP(size={"shortest_edge": px}, crop_size={"height": px, "width": px}), tok).save_pretrained(clip_dir)
    ViTModel(ViTConfig(**dino, image_size=px), add_pooling_layer=False).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": px, "width": px}).save_pretrained(dino_dir)
    return clip_dir, dino_dir


def train_config(args, work: Path, model_dir: Path, instance_dir: Path):
    from nbkit import TrainConfig

    return TrainConfig(
        model=str(model_dir), instance_dir=str(instance_dir), output_dir=str(work / "run"), class_dir=str(work / "c"),
        method="dreambooth", train_text_encoder=True, with_prior_preservation=True, instance_prompt=PROMPT,
        class_prompt=CLASS_PROMPT, num_class_images=1, class_batch_size=1, sample_steps=2, resolution=args.resolution,
        max_train_steps=1, eval_steps=1, eval_seeds=1, use_8bit_adam=True, gradient_checkpointing=True,
        save_dtype="fp16", validation_steps=0, checkpointing_steps=0 if args.no_checkpoint else 1,
        mixed_precision="auto" if args.mode == "rehearsal" else "no", learning_rate=2e-6, seed=0, resume=None)


def _tensor_bytes(tensors) -> int:
    """Bytes of the tensors, each storage once (bitsandbytes shares its quantization maps)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)}.values())


def _counting_step(opt, parts, counted: dict) -> None:
    """Wrap opt.step: count weights and gradients as the step starts, the optimizer state once it is made."""
    inner = opt.step

    def step(self, *a, **kw):
        for name in ("unet", "text_encoder", "vae"):
            counted[f"{name} weights"] = _tensor_bytes(getattr(parts, name).parameters())
        counted["trained weights"] = counted["unet weights"] + counted["text_encoder weights"]
        counted["gradients"] = _tensor_bytes(p.grad for g in opt.param_groups for p in g["params"])
        out = inner(*a, **kw)
        counted["optimizer state"] = _tensor_bytes(v for s in opt.state.values() for v in s.values())
        return out

    opt.step = types.MethodType(step, opt)  # a bound method, as torch's LR schedulers expect


def _wrap(stack, owner, name, make):
    """owner.name = make(owner.name) until the stack closes (a class's own descriptor is what comes back)."""
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, make(getattr(owner, name)))
    stack.callback(setattr, owner, name, raw)


@contextlib.contextmanager
def instrumented(rec: Recorder, seen: dict, fp32: bool):
    """Phases inside nbkit.train and take_home, by wrapping the functions they call; what the disk check expected
    and the tensors counted at the optimizer step land in `seen`. fp32: sampling without autocast (for an all-fp32
    pipeline on the rehearsed T4 sample._autocast picks fp16, unusably slow on this CPU)."""
    from nbkit.data import class_images as prior
    from nbkit.export import takehome
    from nbkit.sample import sampling as sample
    from nbkit.scores import tracking
    from nbkit.training import checkpoint, guards, methods, optim

    def phase(label, after=None):  # label / after: a string, or a function of the call's arguments
        def make(f):
            def run(*a, **kw):
                name, then = (x(*a, **kw) if callable(x) else x for x in (label, after))
                before = rec.label
                rec.switch(name)
                try:
                    return f(*a, **kw)
                finally:
                    rec.switch(then or before)
            return run
        return make

    def setup(f):  # the parts, for counting; the method's save as a phase
        def run(cfg, parts):
            seen["parts"], m = parts, f(cfg, parts)
            return dataclasses.replace(m, save=phase("train: save the model (fp16)", "train: after the step")(m.save))
        return run

    def keep(key, then=lambda x: x):  # seen[key] = what the call returned (passed through `then`)
        def make(f):
            def run(*a, **kw):
                seen[key] = out = then(f(*a, **kw))
                return out
            return run
        return make

    with contextlib.ExitStack() as stack:
        if fp32:
            _wrap(stack, sample, "_autocast", lambda f: lambda pipe, device: contextlib.nullcontext())
        _wrap(stack, methods, "setup", setup)
        _wrap(stack, optim, "make_optimizer",
              keep("optimizer", lambda opt: _counting_step(opt, seen["parts"], seen.setdefault("counted", {})) or opt))
        _wrap(stack, guards, "run_disk_needs", keep("disk_needs"))
        _wrap(stack, tracking.Tracker, "for_training",
              lambda f: classmethod(phase("scorer: load CLIP + DINO", "train: before class images")(f.__func__)))
        _wrap(stack, prior, "ensure_class_images", phase("class images", "train: latents, optimizer"))
        _wrap(stack, tracking.Tracker, "update", phase(
            lambda self, step, pipe: f"scorer: step {step}",
            lambda self, step, pipe: STEP_PHASE if step == 0 else "train: after the step"))
        _wrap(stack, tracking.Tracker, "_keep", phase("scorer: best/ (fp32)"))
        _wrap(stack, checkpoint.Checkpoints, "save", phase("train: checkpoint", "train: after the step"))
        _wrap(stack, takehome, "_write", phase(lambda model, fmt, *a: f"export: write {fmt}",
                                               "export: reference picture"))
        _wrap(stack, takehome, "_reload_and_draw", phase(lambda fmt, *a: f"export: reload {fmt} + draw",
                                                         "export: after the reloads"))
        yield


def _planner_terms(plan) -> dict[str, float]:
    terms = {"weights": 0.0, "optimizer state": 0.0, "gradients": 0.0, "activations": 0.0, "other": 0.0}
    for what, b in plan.rows:
        key = ("weights" if " weights" in what.split("(")[0] else "optimizer state" if what.startswith("optimizer")
               else "gradients" if what.startswith("gradients")
               else "activations" if what.startswith("activ") else "other")
        terms[key] += b / GiB
    terms["peak allocated"] = plan.allocated / GiB
    return terms


def compare(cfg, model: str, counted: dict, train_peak: float, step_start: float) -> dict:
    """The planner's T4 plan (fp16 mixed precision, 16 GiB, no bf16) and the same plan in this run's precision,
    next to the tensors counted at the optimizer step and the RSS measured during the step."""
    from nbkit.memory import planner

    t4 = planner.plan(cfg.replace(mixed_precision="auto"), model, gpu_gb=16, device="cuda", bf16=False)
    same = planner.plan(cfg, model, gpu_gb=16, device="cuda", bf16=False)
    w, grads, opt = (counted.get(k, 0) / GiB for k in ("trained weights", "gradients", "optimizer state"))
    act = max(0.0, train_peak - step_start - grads - opt)
    measured = {"weights": w, "optimizer state": opt, "gradients": grads, "activations": act, "other": None,
                "peak allocated": w + opt + grads + act}
    return {"t4": _planner_terms(t4), "same_precision": _planner_terms(same), "measured": measured,
            "vae_weights_gib": counted.get("vae weights", 0) / GiB, "train_step_peak_rss_gib": train_peak,
            "train_step_start_rss_gib": step_start, "t4_rows": [(w_, b / GiB) for w_, b in t4.rows],
            "t4_precision": t4.settings["precision"], "same_rows": [(w_, b / GiB) for w_, b in same.rows]}


def _folder_bytes(path: Path, single_files: bool = True) -> int:
    """Bytes of a file or under a folder; single_files=False: without the .safetensors right in it (take_home
    writes the single file next to the diffusers folder's parts)."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file() and (
        single_files or not (f.parent == path and f.suffix == ".safetensors"))]
    return sum(f.stat().st_size for f in files)


def disk_check(needs, cfg) -> list[dict]:
    """What guards.run_disk_needs expected per item, next to what the run wrote there."""
    out_dir = Path(cfg.output_dir)
    written = {"class images": _folder_bytes(cfg.class_dir), "checkpoint": _folder_bytes(out_dir / "checkpoints"),
               "the trained": _folder_bytes(out_dir / "model"), "the best model": _folder_bytes(out_dir / "best")}
    key = lambda what: next((k for k in written if k in what), None)  # noqa: E731
    return [{"what": what, "folder": str(folder), "expected_gb": n / 1e9,
             "written_gb": written[key(what)] / 1e9 if key(what) else None} for folder, n, what in needs or []]


_f = lambda x, spec=".2f": "-" if x is None else format(x, spec)  # noqa: E731

def tables(r: dict) -> str:
    lines = ["| phase | seconds | peak RSS GiB | peak anonymous RSS GiB (sampled) | RSS at end GiB |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {p['phase']} | {p['seconds']:.1f} | {p['peak_rss_gib']:.2f} | {_f(p.get('peak_anon_gib'))} | "
              f"{p['end_rss_gib']:.2f} |" for p in r["phases"]]
    top = lambda k: max((p[k] for p in r["phases"] if p.get(k)), default=None)  # noqa: E731 - not ru_maxrss (reset)
    lines.append(f"| **whole run** | **{r['seconds']:.1f}** | **{_f(top('peak_rss_gib'))}** | "
                 f"**{_f(top('peak_anon_gib'))}** | |")
    if r.get("error"):
        lines += ["", "FAILED: " + r["error"].strip().splitlines()[-1]]
    c = r.get("planner")
    if not c:
        return "\n".join(lines)
    lines += ["", f"| term | planner, T4 plan ({c['t4_precision']}) GiB | planner, this run's precision GiB | "
                  "counted / measured here GiB |", "|---|---:|---:|---:|"]
    for k in ("weights", "optimizer state", "gradients", "activations", "other", "peak allocated"):
        lines.append(f"| {k} | {_f(c['t4'][k])} | {_f(c['same_precision'][k])} | {_f(c['measured'][k])} |")
    lines += ["", f"Step RSS {c['train_step_start_rss_gib']:.2f} GiB at start, {c['train_step_peak_rss_gib']:.2f} peak"
                  f" (activations = peak - start - gradients - optimizer); VAE {c['vae_weights_gib']:.2f} GiB."]
    lines += ["", "| disk check item | expected GB | written GB |", "|---|---:|---:|"]
    lines += [f"| {d['what']} | {d['expected_gb']:.3f} | {_f(d['written_gb'], '.3f')} |" for d in r.get("disk", [])]
    lines += ["", "| export | size | seconds | pixel diff mean / max | ok |", "|---|---:|---:|---:|---|"]
    lines += [f"| {e['format']} | {e['size']} | {e['seconds']:.1f} | {_f(e['mean_pixel_diff'])} / "
              f"{e['max_pixel_diff']} | {e['ok']} |" for e in r.get("export", [])]
    return "\n".join(lines)


def _prepare(rec: Recorder, args, work: Path) -> tuple:
    """Build and save the model, build the scorers, load the model back with the notebooks' loader."""
    from nbkit import load_parts
    from nbkit.models.offline import SAMPLE_INSTANCE_DIR
    from nbkit.toy.world import Scene

    rec.switch("build + save (fp32 + fp16 variant)")
    files = build_model(work / "sd15", args.smoke)
    rec.switch("build scorers (CLIP, DINO)")
    clip_dir, dino_dir = build_scorers(work / "scorers", args.smoke, args.clip)
    os.environ["NBKIT_CLIP_MODEL"], os.environ["NBKIT_DINO_MODEL"] = str(clip_dir), str(dino_dir)
    instance = SAMPLE_INSTANCE_DIR if args.smoke else work / "instance"  # smoke: the toy judge's own pictures
    for i, bg in enumerate(() if args.smoke else ("black", "white")):  # full size: toy-world stars at 512 px
        instance.mkdir(exist_ok=True)
        Scene("star", "red", bg).render(args.resolution).save(instance / f"zwx_{i}.png")
    rec.switch("load (load_parts, variant=fp16)")
    parts = load_parts(str(work / "sd15"), variant="fp16")
    # diffusers upcasts what it reads to fp32 unless given torch_dtype (load_parts passes none); transformers keeps
    # the file's fp16. Either way the values must be the fp16 files' (exact in fp16), not the fp32 files'.
    loaded = {}
    for n in ("unet", "text_encoder", "vae"):
        w = max(getattr(parts, n).parameters(), key=lambda t: t.numel()).detach()
        loaded[n] = {"dtype": str(w.dtype), "from_fp16_files": bool(torch.equal(w, w.half().to(w.dtype)))}
    if not all(v["from_fp16_files"] for v in loaded.values()):
        raise AssertionError(f"load_parts(variant='fp16') did not read the fp16 files: {loaded}")
    return parts, files, loaded, instance


def _train_and_export(rec: Recorder, cfg, parts, work: Path, seen: dict) -> list[dict]:
    from nbkit import train
    from nbkit.export.takehome import take_home
    from nbkit.scores import evaluate

    with instrumented(rec, seen, cfg.mixed_precision == "no"):
        rec.switch("train: place weights, disk check")
        seen["result"] = result = train(cfg, parts, progress=False)
        rec.switch("free the optimizer and the scorers")
        seen.pop("optimizer", None), seen.pop("parts", None), evaluate._MODELS.clear(), gc.collect()  # CLIP/DINO cached
        rec.switch("export: check disk")
        exported = take_home(result, work / "export", dtype="fp16", steps=2, size=cfg.resolution)
        rec.switch("free the export")
    return [{"format": k, "path": v.path.name, "size": v.size, "bytes": _folder_bytes(v.path, False),
             "seconds": v.seconds, "mean_pixel_diff": v.mean_pixel_diff, "max_pixel_diff": v.max_pixel_diff,
             "ok": v.ok} for k, v in exported.items()]


def run(args, work: Path) -> dict:
    """Every phase; a failure is recorded (with the figures up to it) rather than raised."""
    rec, seen, t0 = Recorder(0.1 if args.smoke else 1.0), {}, time.perf_counter()
    out = {"date": dt.datetime.now().isoformat(timespec="seconds"), "mode": args.mode, "smoke": args.smoke,
           "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB},
           "versions": {m: importlib.import_module(m).__version__ for m in VERSIONS}, "clip": args.clip,
           "resolution": args.resolution}
    rec.switch("start (imports)")  # the libraries' own memory, before any model
    try:
        parts, out["saved_files"], out["loaded"], instance = _prepare(rec, args, work)
        seen["cfg"] = train_config(args, work, work / "sd15", instance)
        out["export"] = _train_and_export(rec, seen["cfg"], parts, work, seen)
        del parts
    except Exception:  # noqa: BLE001 - what broke is the finding; the figures up to it still count
        out["error"] = traceback.format_exc()
        print(out["error"], flush=True)
    rec.close()
    result, cfg = seen.pop("result", None), seen.get("cfg")
    out.update(seconds=time.perf_counter() - t0, phases=rec.phases(), segments=rec.segments,
               ru_maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,  # since the last reset
               timeline=rec.timeline[:: 1 if args.smoke else 5])
    if result is not None:
        out.update(losses=result.losses, metrics=result.metrics,
                   info={k: result.info.get(k) for k in ("precision", "optimizer", "runtime", "step_seconds")})
    if cfg is not None and "counted" in seen:
        out["counted_gib"] = {k: v / GiB if "rss" not in k else v for k, v in seen["counted"].items()}
        steps = [s for s in rec.segments if s["phase"] == STEP_PHASE] or [{"peak_rss_gib": 0, "start_rss_gib": 0}]
        out["planner"] = compare(cfg, "offline" if args.smoke else "sd15", seen["counted"],
                                 max(s["peak_rss_gib"] for s in steps), steps[0]["start_rss_gib"])
        out["disk"] = disk_check(seen.get("disk_needs"), cfg)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the offline model at 64 px (seconds; what the test runs)")
    ap.add_argument("--mode", choices=("fp32", "rehearsal"), default="fp32", help="see above")
    ap.add_argument("--clip", choices=tuple(CLIPS), default="b32", help="CLIP scorer architecture (b32 = CLIP_ID)")
    ap.add_argument("--no-checkpoint", action="store_true", help="skip the resumable checkpoint after the step")
    ap.add_argument("--work", help="folder for the models (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (deleted otherwise)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    args.resolution = 64 if args.smoke else 512
    env = dict(os.environ)  # put back afterwards: the script may run inside another process
    os.environ["NBKIT_T4_REHEARSAL"] = "1"  # the T4's optimizer (8-bit AdamW) and placement rules on this CPU
    work = Path(args.work or tempfile.mkdtemp(prefix="fullsize_cpu_"))
    work.mkdir(parents=True, exist_ok=True)
    result = run(args, work)
    os.environ.clear()
    os.environ.update(env)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    md = (f"{result['date']} · {'smoke (offline, 64 px)' if args.smoke else 'SD 1.5, 512 px'} · mode {args.mode} · "
          f"{result['machine']['cpus']} CPUs, {result['machine']['ram_gib']:.0f} GiB · "
          + " · ".join(f"{k} {v}" for k, v in result["versions"].items()) + "\n\n" + tables(result))
    print("\n" + md, flush=True)
    stem = Path(args.out) / f"{'smoke-' if args.smoke else ''}fullsize-cpu-{dt.datetime.now():%Y%m%d-%H%M%S}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(md + "\n")
    result["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    return result


if __name__ == "__main__":
    main()
