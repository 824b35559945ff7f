"""Pretrain the toy Stable Diffusion on the toy world: the offline model that actually knows something.

    python -m nbkit pretrain                 # writes data/toy-sd/ (about an hour on 2 CPU cores)
    python -m nbkit pretrain --quick         # a few minutes: checks the whole path, writes to the work folder

Three stages, each checkpointed in a work folder (`--work`, default NBKIT_CACHE/pretrain-seed<seed>) so that a
killed run resumes where it stopped (`python -m nbkit pretrain` again):

1. VAE (short): AutoencoderKL on 32x32 crops of rendered scenes, patterned ones included (the VAE must draw
   any subject later); its latent scaling factor is then measured (1 / std of the latents), as SD's was.
2. Latents: a fixed set of ordinary scenes (never a pattern, never an identifier) is rendered and encoded once.
3. UNet + text encoder, jointly, on those latents with the world's captions, some words left out
   (`toyworld.varied_caption`), named looks often called by their made-up names (`toyworld.NAMES`: what makes an
   identifier the model never saw mean something to it), and 10 % empty captions (classifier-free guidance);
   epsilon prediction on SD 1.5's noise schedule, min-SNR loss weighting, offset noise, a warm-up-stable-decay
   learning rate (constant, then a linear cool-down over the last `cooldown` steps: the cool-down is what makes
   colours clean) and an EMA of the weights (the EMA is what ships).

Offset noise matters here more than anywhere: SD 1.5's schedule leaves a little signal even at the last
timestep, and a toy scene's background is most of the picture, so without it the model learns to read the
background from the mean of the noise (the seed) instead of the prompt.

Every random draw comes from a generator seeded by (seed, stage, step): the same seed gives the same model on the
same machine, resumed or not. The result is a StableDiffusionPipeline folder (safetensors) with the offline spec's
tokenizer and scheduler.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nbkit.models.layout import save_pipeline
from nbkit.models.offline import OFFLINE_RESOLUTION, OFFLINE_SPEC, PRETRAINED_TOY, cache_dir
from nbkit.safeio import load_tree, save_tree
from nbkit.toy import world as toyworld


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on (written next to the model)."""

    seed: int = 0
    resolution: int = OFFLINE_RESOLUTION
    # stage 1: VAE
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_crop: int = 32  # the VAE has no attention: it trains on crops, 4x cheaper than whole images
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_pattern_share: float = 0.4  # share of patterned scenes in the VAE's data
    # stage 2: the pretraining set
    n_scenes: int = 8000
    # stage 3: UNet + text encoder
    steps: int = 8000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 200
    cooldown: int = 2000  # the last steps, over which the learning rate falls linearly to 10 % (0: constant to the end)
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    named_share: float = 0.5  # captions that call a named look by its name (toyworld.NAMES; 0: never)
    snr_gamma: float = 5.0  # min-SNR weighting (Hang et al. 2023); 0 turns it off
    offset_noise: float = 0.1  # std of a per-image, per-channel noise offset (0: off), see train_unet
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    threads: int = 0  # torch threads; 0 leaves torch's default

    @classmethod
    def quick(cls, **kw) -> PretrainConfig:
        """A few minutes end to end: checks the path, not a model worth shipping."""
        return cls(**{**dict(vae_steps=60, n_scenes=256, steps=60, checkpoint_every=30, warmup=10), **kw})


def _gen(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 100_000_007 + step)


def _schedule(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    return min(1.0, (step + 1) / max(1, warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / total)))


def _warmup_stable_decay(step: int, warmup: int, total: int, cooldown: int) -> float:
    """Linear warm-up, a constant rate, then a linear fall to 10 % over the last `cooldown` steps."""
    start = total - cooldown
    fall = 1.0 - 0.9 * (step + 1 - start) / cooldown if cooldown and step >= start else 1.0
    return min(1.0, (step + 1) / max(1, warmup)) * fall


def _to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _save_state(path: Path, state: dict) -> None:
    save_tree(state, path)  # safetensors, atomic: a kill mid-write keeps the previous checkpoint


def _load_state(path: Path) -> dict | None:
    return load_tree(path) if path.exists() else None


def _log(work: Path, row: dict) -> None:
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- stage 1: VAE
def train_vae(cfg: PretrainConfig, work: Path):
    """Train the AutoencoderKL (checkpointed); return it with its measured scaling factor set."""
    from diffusers import AutoencoderKL

    done = work / "vae"
    if (done / "config.json").exists():
        return AutoencoderKL.from_pretrained(done)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(OFFLINE_SPEC / "vae"))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt, start = work / "vae_state.safetensors", 0
    if (state := _load_state(ckpt)) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    vae.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _schedule(step, 50, cfg.vae_steps)
        rng = random.Random(cfg.seed * 7919 + step)
        scenes = [toyworld.patterned_scene(rng) if rng.random() < cfg.vae_pattern_share else toyworld.random_scene(rng)
                  for _ in range(cfg.vae_batch)]
        x = _to_tensor([s.render(cfg.resolution) for s in scenes])
        c = cfg.vae_crop
        if c < cfg.resolution:
            g = _gen(cfg.seed, 1, step)
            ij = torch.randint(0, cfg.resolution - c + 1, (len(x), 2), generator=g)
            x = torch.stack([im[:, i:i + c, j:j + c] for im, (i, j) in zip(x, ij.tolist())])
        post = vae.encode(x).latent_dist
        z = post.sample(generator=_gen(cfg.seed, 11, step))
        rec = vae.decode(z).sample
        rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        loss = rec_loss + cfg.vae_kl_weight * post.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == cfg.vae_steps:
            _log(work, {"stage": "vae", "step": step + 1, "rec": round(rec_loss.item(), 5),
                        "s": round(time.perf_counter() - t0, 1)})
        if (step + 1) % cfg.checkpoint_every == 0:
            _save_state(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    vae.eval()
    # SD's trick: scale latents to unit variance, measured on fresh scenes
    rng = random.Random(cfg.seed + 1)
    with torch.no_grad():
        x = _to_tensor([toyworld.random_scene(rng).render(cfg.resolution) for _ in range(256)])
        std = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, 256, 64)]).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(done, safe_serialization=True)
    ckpt.unlink(missing_ok=True)
    return vae


# ---------------------------------------------------------------- stage 2: the pretraining set
def encode_scenes(cfg: PretrainConfig, vae, work: Path) -> tuple[torch.Tensor, list[toyworld.Scene]]:
    """Render `n_scenes` ordinary scenes and encode them once: (latent mean and std [n, 2, 4, h, w], scenes)."""
    from safetensors.torch import load_file, save_file

    rng = random.Random(cfg.seed + 2)
    scenes = [toyworld.random_scene(rng) for _ in range(cfg.n_scenes)]
    path = work / "latents.safetensors"
    if path.exists():
        return load_file(path)["latents"], scenes
    out = []
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            d = vae.encode(_to_tensor([s.render(cfg.resolution) for s in scenes[i:i + 64]])).latent_dist
            out.append(torch.stack([d.mean, d.std], 1))
    lat = torch.cat(out).contiguous()
    save_file({"latents": lat}, str(path))
    return lat, scenes


# ---------------------------------------------------------------- stage 3: UNet + text encoder
def _unet_parts(cfg: PretrainConfig):
    """Tokenizer, UNet, text encoder and noise schedule, the models initialised from the seed."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(OFFLINE_SPEC / "tokenizer")
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(OFFLINE_SPEC / "unet"))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(OFFLINE_SPEC / "text_encoder"))
    noise_sched = DDPMScheduler.from_config(DDPMScheduler.load_config(OFFLINE_SPEC / "scheduler"))
    return tok, unet, te, noise_sched


def _resume_unet(unet, te, opt, ema, ckpt: Path, weights: Path) -> int:
    """Load the last UNet-stage checkpoint into the parts, if there is one; return the step to start at."""
    from safetensors.torch import load_file

    if (state := _load_state(ckpt)) is None or not weights.exists():
        return 0
    sd = load_file(weights)
    unet.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("unet.")})
    te.load_state_dict({k[3:]: v for k, v in sd.items() if k.startswith("te.")})
    opt.load_state_dict(state["opt"])
    ema.load_state_dict(state["ema"])
    start = state["step"]
    print(f"resuming UNet + text encoder at step {start}", flush=True)
    return start


def _save_unet(unet, te, opt, ema, ckpt: Path, weights: Path, step: int) -> None:
    """The UNet stage's checkpoint: weights (written aside, then moved in place), then optimizer and EMA state."""
    from safetensors.torch import save_file

    sd = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    sd |= {f"te.{k}": v for k, v in te.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(weights.with_suffix(".tmp")))
    weights.with_suffix(".tmp").replace(weights)
    _save_state(ckpt, {"opt": opt.state_dict(), "ema": ema.state_dict(), "step": step})


def _unet_loss(cfg: PretrainConfig, parts, latents: torch.Tensor, scenes: list, scaling: float, step: int):
    """One step's batch (every draw seeded by the step) and its noise-prediction loss."""
    from diffusers.training_utils import compute_snr

    tok, unet, te, noise_sched = parts
    g = _gen(cfg.seed, 3, step)
    rng = random.Random(cfg.seed * 104_729 + step)
    idx = torch.randint(0, len(scenes), (cfg.batch,), generator=g)
    mean, std = latents[idx, 0], latents[idx, 1]
    lat = (mean + std * torch.randn(mean.shape, generator=g)) * scaling
    flip = torch.rand(cfg.batch, generator=g) < 0.5  # mirror images are scenes of the world too
    lat = torch.where(flip[:, None, None, None], lat.flip(-1), lat)
    captions = ["" if rng.random() < cfg.caption_dropout
                else toyworld.pretraining_caption(scenes[i], rng, cfg.named_share)
                for i in idx.tolist()]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=g)
    if cfg.offset_noise:
        noise = noise + cfg.offset_noise * torch.randn((cfg.batch, lat.shape[1], 1, 1), generator=g)
    pred = unet(noise_sched.add_noise(lat, noise, t), t, te(ids)[0]).sample
    per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma > 0:
        snr = compute_snr(noise_sched, t)
        per = per * torch.clamp(snr, max=cfg.snr_gamma) / snr
    return per.mean()


def train_unet(cfg: PretrainConfig, vae, latents: torch.Tensor, scenes: list, work: Path):
    """Train UNet and text encoder jointly (checkpointed); return both with their EMA weights copied in."""
    from diffusers.training_utils import EMAModel

    parts = _unet_parts(cfg)
    tok, unet, te, _ = parts
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    ckpt, weights = work / "unet_state.safetensors", work / "unet_ckpt.safetensors"
    start = _resume_unet(unet, te, opt, ema, ckpt, weights)

    scaling = vae.config.scaling_factor
    unet.train()
    te.train()
    t0, run = time.perf_counter(), []
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _warmup_stable_decay(step, cfg.warmup, cfg.steps, cfg.cooldown)
        loss = _unet_loss(cfg, parts, latents, scenes, scaling, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        run.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            _log(work, {"stage": "unet", "step": step + 1, "loss": round(sum(run) / len(run), 5),
                        "lr": round(opt.param_groups[0]["lr"], 7), "s": round(time.perf_counter() - t0, 1)})
            run = []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_unet(unet, te, opt, ema, ckpt, weights, step + 1)
    ema.copy_to(params)
    unet.eval()
    te.eval()
    return unet, te, tok


def export(vae, unet, te, tok, dest: Path, cfg: PretrainConfig, seconds: float) -> Path:
    """Write a StableDiffusionPipeline folder (safetensors) with the spec's scheduler, and its README."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=PNDMScheduler.from_pretrained(OFFLINE_SPEC / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(pipe, tmp)  # the Hub's layout: transformers 4.x loads the toy model too
    (tmp / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
    (tmp / "README.md").write_text(readme(cfg, seconds, mb))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def readme(cfg: PretrainConfig, seconds: float, mb: float) -> str:
    args = "".join(f" --{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(PretrainConfig, k))
    return f"""# toy-sd: a tiny Stable Diffusion pretrained on the toy world

Made by `python -m nbkit pretrain{args}` (nbkit/pretrain.py), seed {cfg.seed}.

- Time: {seconds / 60:.1f} min on {platform.machine()} {platform.system()}, torch {torch.__version__},
  {torch.get_num_threads()} torch thread(s), on {_cpu_name()} (shared with other jobs when it was made).
- Size: {mb:.1f} MB, safetensors. Parts: AutoencoderKL (factor 4: 64 px -> 16x16x4), UNet2DConditionModel,
  CLIPTextModel, CLIPTokenizer (the offline spec's, data/offline-sd/tokenizer), PNDMScheduler (SD 1.5's schedule).
- Data: {cfg.n_scenes} ordinary scenes of nbkit.toy.world (no pattern, no identifier ever), captions from
  toyworld.pretraining_caption ({cfg.named_share:.0%} of the named looks of toyworld.NAMES called by their names),
  {cfg.caption_dropout:.0%} empty (classifier-free guidance). VAE: {cfg.vae_steps} steps;
  UNet + text encoder: {cfg.steps} steps at batch {cfg.batch}, LR {cfg.lr:g} with the last {cfg.cooldown} steps cooling
  down to 10 %, EMA {cfg.ema_decay}.
- What it knows, measured by the toy judge: docs/findings.md (`python -m benchmarks.findings`).

Full settings: pretrain_config.json. Same seed, same machine type: same weights.
"""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def pretrain(cfg: PretrainConfig, out: Path | None = None, work: Path | None = None) -> Path:
    """Run (or resume) every stage; write the pipeline folder to `out`; return it."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    work = Path(work or cache_dir() / f"pretrain-seed{cfg.seed}")
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "config.json"
    if saved.exists() and json.loads(saved.read_text()) != asdict(cfg):
        raise SystemExit(f"{work} holds a run with other settings ({saved}); pass another --work or delete it.")
    saved.write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.perf_counter()
    prev = float((work / "seconds").read_text()) if (work / "seconds").exists() else 0.0
    try:
        vae = train_vae(cfg, work)
        vae.requires_grad_(False)
        latents, scenes = encode_scenes(cfg, vae, work)
        unet, te, tok = train_unet(cfg, vae, latents, scenes, work)
    finally:
        (work / "seconds").write_text(str(prev + time.perf_counter() - t0))
    seconds = prev + time.perf_counter() - t0
    return export(vae, unet, te, tok, Path(out or work / "toy-sd"), cfg, seconds)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nbkit pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help=f"where the pipeline goes (default {PRETRAINED_TOY}; --quick: work folder)")
    p.add_argument("--work", default=None, help="checkpoints and logs (default NBKIT_CACHE/pretrain-seed<seed>)")
    p.add_argument("--quick", action="store_true", help="a few minutes, to check the path")
    for f, v in asdict(PretrainConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None)
    a = p.parse_args(argv)
    kw = {f: getattr(a, f) for f in asdict(PretrainConfig()) if getattr(a, f) is not None}
    cfg = PretrainConfig.quick(**kw) if a.quick else PretrainConfig(**kw)
    work = a.work or (cache_dir() / f"pretrain-{'quick-' if a.quick else ''}seed{cfg.seed}")
    out = a.out or (Path(work) / "toy-sd" if a.quick else PRETRAINED_TOY)
    dest = pretrain(cfg, Path(out), Path(work))
    print(f"wrote {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
