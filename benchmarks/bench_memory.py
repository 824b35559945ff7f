"""Peak GPU memory and seconds per step of every method under each memory preset, on full-size SD 1.5.

    python benchmarks/bench_memory.py                 # a CUDA GPU: SD 1.5 at 512 px, capped at 16 GiB
    python benchmarks/bench_memory.py --smoke         # anywhere: the offline model at 64 px, 2 steps (CI)
    python benchmarks/bench_memory.py --sdxl          # SDXL LoRA rank 4/8/16 at 1024 px: measured on a GPU,
                                                      # planned (and labelled so) without one

SD 1.5 is built from its configs (data/sd15-arch) with random weights, directly on the GPU: nothing is
downloaded, and random weights cost exactly the memory and time of the real ones. The GPU is capped with
`torch.cuda.set_per_process_memory_fraction` (default 16 GiB, a T4 / P100 stand-in) and the presets are tuned
for a 16 GiB fp16-only card, so the figures are what a free Colab/Kaggle GPU would see. Per method (DreamBooth
UNet, + text encoder, + prior preservation, textual inversion, LoRA) and preset it runs `nbkit.train` and
records `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the whole run and the median seconds
per step; then a reference loop that does what the diffusers DreamBooth example does each step (VAE encode
and text-encoder forward every step, no caching; same precision, optimizer and checkpointing); and the
planner's prediction. Results: a markdown table on stdout and JSON + markdown under --out.

`--sdxl`: SDXL base 1.0 LoRA (rank 4 / 8 / 16, 1024 px, batch 1, fp16, 8-bit AdamW, gradient checkpointing, latents
and prompt embeddings cached; target: peak allocated <= 14 GiB under the 16 GiB cap). On a GPU, SDXL is built from
data/sdxl-arch with random weights (nbkit.memory.sdxlarch: real sizes, random values) and `sdxl_lora_run` does what
the kit's loop does with it: every network placed (UNet and both text encoders fp16, the VAE fp32), the VAE encoding
the pictures two at a time then leaving the GPU, then the steps on cached inputs; it records the caching phase's
peak and the steps' peak separately. Without a GPU the rows are the planner's, labelled "planned".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nbkit.config import TrainConfig
from nbkit.env.runtime import Runtime
from nbkit.memory import planner, tuning
from nbkit.models import sd15
from nbkit.training import methods

GiB = 2**30
METHODS = {
    "dreambooth": dict(method="dreambooth"),
    "dreambooth+te": dict(method="dreambooth", train_text_encoder=True),
    "dreambooth+te+prior": dict(method="dreambooth", train_text_encoder=True, with_prior_preservation=True,
                                class_prompt="a photo of a star", num_class_images=4),
    "ti": dict(method="textual_inversion", instance_prompt="a photo of <zwx>", initializer_token="star"),
    "lora": dict(method="lora"),
}
SDXL_RANKS = (4, 8, 16)
SDXL_TARGET_GIB = 14.0  # SDXL LoRA at 1024 px, batch 1, under the 16 GiB cap (issue 17)
TARGETS_GIB = {("dreambooth", "16gb"): 9.5, ("dreambooth+te+prior", "16gb"): 11.0,
               ("dreambooth+te+prior", "8gb"): 8.0, ("ti", "16gb"): 5.0, ("lora", "16gb"): 5.0}


def _images(folder: Path, n: int, size: int, seed: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder


@contextlib.contextmanager
def _no_saving():
    """Benchmarks measure training; writing a 4 GB model folder per run would only measure the disk."""
    original = methods.setup

    def setup(cfg, parts):
        m = original(cfg, parts)
        m.save = lambda p, out: out
        return m

    methods.setup = setup
    try:
        yield
    finally:
        methods.setup = original


def _fresh_parts(smoke: bool, device: str, cfg: TrainConfig):
    """New parts per run (methods change them), each created in the dtype the loop will give it."""
    if smoke:
        from nbkit import load_parts

        return load_parts("offline")
    half = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    full = cfg.method == "dreambooth"
    dtypes = {"unet": torch.float32 if full else half, "vae": half,
              "text_encoder": torch.float32 if (cfg.train_text_encoder and full) or cfg.method == "textual_inversion"
              else half}
    return sd15.build_parts(device, dtypes=dtypes)


def _reset_cuda():
    import gc

    gc.collect()  # an OOM's traceback may still hold the last run's tensors
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> tuple[float | None, float | None]:
    if not torch.cuda.is_available():
        return None, None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GiB, torch.cuda.max_memory_reserved() / GiB


def run_nbkit(cfg: TrainConfig, smoke: bool, device: str, warmup: int) -> dict:
    from nbkit.training.loop import train

    parts = _fresh_parts(smoke, device, cfg)
    _reset_cuda()
    try:
        with _no_saving(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = train(cfg, parts, progress=False)
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM", **dict(zip(("allocated", "reserved"), _peaks()))}
    except FloatingPointError as err:  # random weights overflowing in fp16: the memory figures still hold
        return {"status": "non-finite loss", "error": str(err).splitlines()[0],
                **dict(zip(("allocated", "reserved"), _peaks()))}
    finally:
        del parts
    alloc, res = _peaks()
    times = r.info["step_seconds"][warmup:] or r.info["step_seconds"]
    out = {"status": "ok", "allocated": alloc, "reserved": res, "s_per_step": statistics.median(times),
           "optimizer": r.info["optimizer"], "in_backward": r.info["optimizer_in_backward"],
           "final_loss": r.losses[-1], "finite": all(math.isfinite(x) for x in r.losses)}
    del r
    return out


def run_reference(cfg: TrainConfig, smoke: bool, device: str, steps: int, warmup: int) -> dict:
    """What diffusers' train_dreambooth.py does each step: load + transform the images, VAE-encode them, run
    the text encoder, then the UNet forward/backward and the optimizer step (same precision/optimizer/ckpt)."""
    import torch.nn.functional as F

    from nbkit.data import images as data
    from nbkit.training.optim import make_optimizer

    parts = _fresh_parts(smoke, device, cfg)
    dev = torch.device(device)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    method = methods.setup(cfg, parts)
    trainable = method.trainable_modules(parts)
    for name in ("unet", "text_encoder", "vae"):
        m = getattr(parts, name)
        fp32 = name in trainable and method.name != "lora"
        m.to(dev, dtype=torch.float32 if fp32 or half is None else half)
    if method.name == "lora":
        from diffusers.training_utils import cast_training_params

        cast_training_params([parts.unet, parts.text_encoder], dtype=torch.float32)
    if cfg.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if method.trains_text_encoder:
            parts.text_encoder.gradient_checkpointing_enable()
    for m in trainable.values():
        m.train()
    opt = make_optimizer(method.params, cfg, dev.type)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.mixed_precision == "fp16")
    images = [e.image for e in data.load_folder(cfg.instance_dir, cfg.resolution)]
    cls = ([e.image for e in data.load_folder(cfg.class_dir, cfg.resolution, "class")]
           if cfg.with_prior_preservation else [])
    prompt = cfg.instance_prompt.replace(cfg.placeholder_token, " ".join(methods.ti_tokens(cfg)))
    sched = parts.noise_scheduler
    times = []
    _reset_cuda()
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            px = [data.to_tensor(images[step % len(images)], cfg.resolution)]
            prompts = [prompt]
            if cls:
                px.append(data.to_tensor(cls[step % len(cls)], cfg.resolution))
                prompts.append(cfg.class_prompt)
            px = torch.stack(px).to(dev, dtype=half or torch.float32)
            with torch.no_grad():
                lat = parts.vae.encode(px).latent_dist.sample() * parts.vae.config.scaling_factor
            ids = parts.tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                                  return_tensors="pt").input_ids.to(dev)
            with torch.autocast(dev.type, dtype=half or torch.float32, enabled=half is not None):
                with contextlib.nullcontext() if method.trains_text_encoder else torch.no_grad():
                    emb = parts.text_encoder(ids)[0]
                noise = torch.randn_like(lat, dtype=torch.float32)
                t = torch.randint(0, 1000, (len(lat),), device=dev)
                noisy = sched.add_noise(lat.float(), noise, t)
                pred = parts.unet(noisy, t, emb).sample.float()
            loss = F.mse_loss(pred, noise)
            scaler.scale(loss).backward()
            if cfg.max_grad_norm > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(method.params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            method.after_step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    finally:
        del parts, opt
    alloc, res = _peaks()
    return {"status": "ok", "allocated": alloc, "reserved": res,
            "s_per_step": statistics.median(times[warmup:] or times)}


def sdxl_config(rank: int, res: int = 1024, steps: int = 12) -> TrainConfig:
    """The SDXL LoRA rows' run: the 16 GB preset's SDXL settings (nbkit.training.presets), batch 1, cached inputs."""
    return TrainConfig(model="sdxl", method="lora", lora_rank=rank, resolution=res, mixed_precision="fp16",
                       use_8bit_adam=True, gradient_checkpointing=True, cache_latents=True, train_batch_size=1,
                       max_train_steps=steps, validation_steps=0, learning_rate=1e-4)


def sdxl_lora_run(cfg: TrainConfig, steps: int, warmup: int) -> dict:
    """Peak GPU memory of an SDXL LoRA run as the kit's loop places it, on random weights (module doc)."""
    import torch.nn.functional as F
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from nbkit.memory import phases, sdxlarch
    from nbkit.training.optim import make_optimizer

    dev, half = torch.device("cuda"), torch.float16
    _reset_cuda()
    try:
        nets = sdxlarch.build(dev, dtypes={"unet": half, "text_encoder": half, "text_encoder_2": half,
                                           "vae": torch.float32})
        for m in (nets.unet, nets.text_encoder, nets.text_encoder_2, nets.vae):
            m.requires_grad_(False)
        nets.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                         target_modules=methods.LORA_TARGETS_UNET))
        cast_training_params([nets.unet], dtype=torch.float32)
        with torch.no_grad():  # caching: the pictures a few at a time through the fp32 VAE, the prompt once
            px = torch.rand(phases.encode_chunk(cfg.resolution), 3, cfg.resolution, cfg.resolution, device=dev) * 2 - 1
            lat = nets.vae.encode(px).latent_dist.sample()[:1].float() * nets.vae.config.scaling_factor
            ids = torch.randint(0, 49_408, (1, 77), device=dev)
            nets.text_encoder(ids, output_hidden_states=True)
            nets.text_encoder_2(ids, output_hidden_states=True)
        caching = _peaks()
        nets.vae.to("cpu")
        del px
        _reset_cuda()
        emb = torch.randn(1, 77, nets.unet.config.cross_attention_dim, device=dev)  # cached, finite
        cond = sdxlarch.added_conditions(nets.unet.config, 1)["added_cond_kwargs"]
        cond = {k: v.to(dev) for k, v in cond.items()}
        nets.unet.enable_gradient_checkpointing()
        nets.unet.train()
        params = [p for p in nets.unet.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg, "cuda")
        scaler, times = torch.amp.GradScaler("cuda"), []
        for _ in range(steps):
            t0 = time.perf_counter()
            noise = torch.randn_like(lat)
            with torch.autocast("cuda", dtype=half, cache_enabled=False):
                pred = nets.unet(lat + noise, torch.randint(0, 1000, (1,), device=dev), emb,
                                 added_cond_kwargs=cond).sample
            scaler.scale(F.mse_loss(pred.float(), noise)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM", **dict(zip(("allocated", "reserved"), _peaks()))}
    alloc, res = _peaks()
    stepped = bool(opt.state)  # an fp16 overflow on every step would skip the optimizer (and its state)
    return {"status": "ok" if stepped else "optimizer never stepped (fp16 overflow)", "allocated": alloc,
            "reserved": res, "caching_allocated": caching[0], "caching_reserved": caching[1],
            "s_per_step": statistics.median(times[warmup:] or times), "trainable": sum(p.numel() for p in params)}


def sdxl_rows(cuda: bool, cap_gib: float, steps: int, warmup: int, res: int = 1024) -> list[dict]:
    """The SDXL LoRA rows: measured (cuda) or planned, each with the planner's figures."""
    rows = []
    for rank in SDXL_RANKS:
        cfg = sdxl_config(rank, res, steps)
        p = planner.plan(cfg, "sdxl", gpu_gb=cap_gib, device="cuda", bf16=False)
        row = {"model": "sdxl", "method": "lora", "rank": rank, "resolution": res,
               "settings": "fp16, 8-bit, ckpt, cached latents + embeddings", "planner_step_gib": p.allocated / GiB,
               "planner_peak_gib": p.peak / GiB, "planner_needed_gib": p.needed / GiB, "planner_fits": p.fits,
               "planner_caching_gib": next((b for what, b in p.phases if what.startswith("caching")), 0) / GiB,
               "measured": sdxl_lora_run(cfg, steps, warmup) if cuda else None}
        rows.append(row)
        print(sdxl_table([row]).splitlines()[-1], flush=True)
    return rows


def sdxl_table(rows: list[dict]) -> str:
    head = ("| model | method | rank | px | settings | figures | step peak allocated GiB | caching peak allocated GiB "
            "| run peak allocated GiB | planner needed GiB | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["measured"]
        if m:
            figs = ("measured" if m["status"] == "ok" else m["status"], m.get("allocated"),
                    m.get("caching_allocated"), max(x for x in (m.get("allocated"), m.get("caching_allocated"), 0)
                                                    if x is not None))
        else:
            figs = ("planned, not measured", r["planner_step_gib"], r["planner_caching_gib"], r["planner_peak_gib"])
        peak = figs[3]
        verdict = "" if not peak else (" (" + ("" if m else "planned: ") + ("met" if peak <= SDXL_TARGET_GIB
                                                                             else "MISSED") + ")")
        lines.append(f"| {r['model']} | {r['method']} | {r['rank']} | {r['resolution']} | {r['settings']} | "
                     f"{figs[0]} | {_fmt(figs[1])} | {_fmt(figs[2])} | {_fmt(peak)} | "
                     f"{_fmt(r['planner_needed_gib'])} | "
                     f"<= {SDXL_TARGET_GIB:.1f}{verdict} |")
    return "\n".join(lines)


def _versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    v = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
         "accelerate": accelerate.__version__}
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        v["bitsandbytes"] = "not installed"
    return v


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| method | preset | settings | peak allocated GiB | peak reserved GiB | planner GiB | planner error | "
            "s/step | reference s/step | ratio | reference peak GiB | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        n, ref = r["nbkit"], r.get("reference") or {}
        err = None
        if n.get("allocated") and r["planner_gib"]:
            err = (r["planner_gib"] - n["allocated"]) / n["allocated"] * 100
        ratio = n["s_per_step"] / ref["s_per_step"] if n.get("s_per_step") and ref.get("s_per_step") else None
        target = TARGETS_GIB.get((r["method"], r["preset"]))
        lines.append(
            f"| {r['method']} | {r['preset']} | {r['settings']} | "
            f"{_fmt(n.get('allocated')) if n['status'] == 'ok' else n['status']} | {_fmt(n.get('reserved'))} | "
            f"{_fmt(r['planner_gib'])} | {_fmt(err, '+.1f')}{'%' if err is not None else ''} | "
            f"{_fmt(n.get('s_per_step'), '.3f')} | {_fmt(ref.get('s_per_step'), '.3f')} | {_fmt(ratio, '.2f')} | "
            f"{_fmt(ref.get('allocated'))} | {'<= %.1f' % target if target else ''} |")
    return "\n".join(lines)


def _sdxl_main(args) -> dict:
    cuda = torch.cuda.is_available()
    steps, warmup = args.steps or 6, args.warmup if args.warmup is not None else 2
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / total))
        torch.backends.cuda.matmul.allow_tf32 = False
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "none (planned, not measured)"
    rows = sdxl_rows(cuda, args.cap_gib, steps, warmup)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "gpu": gpu, "cap_gib": args.cap_gib,
              "resolution": 1024, "steps": steps if cuda else 0, "measured": cuda, "versions": _versions(),
              "rows": rows}
    md = (f"{result['date']} · GPU: {gpu}" + (f" capped at {args.cap_gib:g} GiB" if cuda else
                                             f" · planner for a {args.cap_gib:g} GiB cap") + " · SDXL LoRA 1024 px · "
          + " · ".join(f"{k} {v}" for k, v in result["versions"].items()) + "\n\n" + sdxl_table(rows))
    return _record(result, md, args.out, "sdxl-gpu" if cuda else "sdxl-planned")


def _record(result: dict, md: str, folder: str, kind: str) -> dict:
    """Print the table; write it and the raw figures under `folder` as <kind>-<date>.md/.json."""
    print("\n" + md)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(md + "\n")
    result["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the offline model at 64 px on any device (CI)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--presets", default=None, help="comma list: auto and/or preset names (default auto,16gb,8gb; "
                                                     "smoke: cpu)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 12; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 2; smoke 0)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--cap-gib", type=float, default=16.0, help="GPU memory cap (set_per_process_memory_fraction)")
    ap.add_argument("--no-reference", action="store_true", help="skip the diffusers-style reference loop")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print one table from earlier runs' JSON files")
    ap.add_argument("--sdxl", action="store_true", help="SDXL LoRA rank 4/8/16 at 1024 px (measured on a GPU, planned "
                                                         "without one)")
    args = ap.parse_args(argv)
    if args.sdxl:
        return _sdxl_main(args)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for run in runs for r in run["rows"]]
        heads = sorted({f"{run['date']} · {run['gpu']} · " + " · ".join(f"{k} {v}" for k, v in run["versions"].items())
                        for run in runs})
        print("\n".join(heads) + "\n\n" + table(rows))
        return {"rows": rows}

    smoke = args.smoke
    cuda = torch.cuda.is_available() and not smoke
    if not smoke and not cuda:
        ap.error("no CUDA GPU here: run with --smoke (the offline model), or on a GPU")
    device = "cuda" if cuda else "cpu"
    steps = args.steps or (2 if smoke else 12)
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 2)
    res = 64 if smoke else args.resolution
    preset_names = (args.presets or ("cpu" if smoke else "auto,16gb,8gb")).split(",")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / total))
        torch.backends.cuda.matmul.allow_tf32 = False  # a T4 has no TF32: keep the comparison honest
        rt = Runtime("local", "cuda", f"{torch.cuda.get_device_name(0)} capped at {args.cap_gib:g} GiB", 1,
                     args.cap_gib, False)  # tune as for a 16 GiB fp16-only card (T4 / P100)
        gpu = torch.cuda.get_device_name(0)
    else:
        rt = Runtime("local", "cpu", None, 0, 0.0, False)
        gpu = "none (CPU smoke run)"
    model = "offline" if smoke else "sd15"
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    inst = _images(work / "instance", 5, res, 0)
    cls = _images(work / "class", 4, res, 1)
    rows = []
    for mname in args.methods.split(","):
        if mname not in METHODS:
            ap.error(f"unknown method {mname!r}: choose from {', '.join(METHODS)}")
        for pname in preset_names:
            base = TrainConfig(model=model, instance_dir=str(inst), output_dir=str(work / "out" / f"{mname}-{pname}"),
                               resolution=res, max_train_steps=steps, learning_rate=1e-6, validation_steps=0,
                               class_dir=str(cls), **METHODS[mname])
            try:
                tuned = tuning.tune(base, pname, rt)
            except ValueError as err:  # e.g. 8gb-deepspeed with the text encoder
                print(f"skip {mname} / {pname}: {err}")
                continue
            cfg = tuned.config
            if cfg.deepspeed_config:
                print(f"skip {mname} / {pname}: DeepSpeed runs under `accelerate launch` (see benchmarks/RESULTS.md)")
                continue
            p = planner.plan(cfg, model, gpu_gb=rt.gpu_memory_gb or None, device=rt.device, bf16=rt.bf16)
            settings = (f"{cfg.mixed_precision}, {'8-bit' if cfg.use_8bit_adam and cuda else 'AdamW'}"
                        f"{', ckpt' if cfg.gradient_checkpointing else ''}"
                        f"{', in-backward' if cfg.optimizer_in_backward else ''}")
            print(f"== {mname} / {pname}: {settings}", flush=True)
            row = {"method": mname, "preset": pname if pname != "auto" else f"auto ({tuned.preset})",
                   "settings": settings, "planner_gib": p.peak / GiB, "planner_fits": p.fits,  # the run's peak
                   "tune_changes": tuned.changes, "nbkit": run_nbkit(cfg, smoke, device, warmup)}
            if not args.no_reference:
                row["reference"] = run_reference(cfg, smoke, device, steps, warmup)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "gpu": gpu,
              "cap_gib": args.cap_gib if cuda else None, "resolution": res, "steps": steps, "warmup": warmup,
              "smoke": smoke, "versions": _versions(), "rows": rows}
    md = (f"{result['date']} · GPU: {gpu}" + (f" capped at {args.cap_gib:g} GiB" if cuda else "") + f" · {res} px · "
          + " · ".join(f"{k} {v}" for k, v in result["versions"].items()) + "\n\n" + table(rows))
    return _record(result, md, args.out, "smoke" if smoke else "gpu")


if __name__ == "__main__":
    main()
