"""The T4 path, checked: every method trains a few steps the way a 16 GB T4 trains it, then what a T4 user needs
is asserted (finite losses, the loss scale, what changed and in which precision, samples, exports, resume).

Two places run the same checks:
- tests/test_t4_rehearsal.py on the CPU, with NBKIT_T4_REHEARSAL=1 (nbkit.env.runtime): fp16 frozen weights, CPU fp16
  autocast, `torch.amp.GradScaler("cpu")`, bitsandbytes' 8-bit AdamW, gradient checkpointing, the optimizer in
  backward: a T4's lines of code, on CPU kernels;
- benchmarks/gpu_check.py on a CUDA GPU: the same lines on the real kernels.

    python -m benchmarks.t4_path            # every case here (NBKIT_T4_REHEARSAL=1 is set when there is no GPU)
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

STEPS = 2  # optimizer steps per case: enough for the scale, the optimizer state and a checkpoint to matter
CASES = {  # case -> TrainConfig settings (over BASE); a method is which parameters train + which loss terms
    "dreambooth": dict(method="dreambooth"),
    "dreambooth_te_prior": dict(method="dreambooth", train_text_encoder=True, with_prior_preservation=True),
    "lora": dict(method="lora", learning_rate=1e-3),
    "lora_te": dict(method="lora", lora_text_encoder=True, learning_rate=1e-3),
    "textual_inversion": dict(method="textual_inversion", learning_rate=1e-2),
    "ti_dreambooth": dict(method="dreambooth"),  # DreamBooth starting from the learned word (run after TI)
    "8gb": dict(method="dreambooth", train_text_encoder=True, with_prior_preservation=True,
                optimizer_in_backward=True, max_grad_norm=0.0),  # the 8gb preset's optimizer in backward
}
BASE = dict(resolution=64, max_train_steps=STEPS, learning_rate=1e-4, use_8bit_adam=True, gradient_checkpointing=True,
            mixed_precision="auto", save_dtype="fp16", validation_steps=STEPS, num_validation_images=1, sample_steps=2,
            num_class_images=2, class_batch_size=2, class_prompt="a photo of a star", placeholder_token="<zwx>",
            initializer_token="star")
PROMPT = {"textual_inversion": "a photo of <zwx>", "ti_dreambooth": "a photo of <zwx>"}


@dataclass
class Facts:
    """One case's run: its result and the weights before it."""

    case: str
    result: object  # nbkit.TrainResult
    before: dict[str, torch.Tensor]  # "unet.<param>" -> fp32 copy on the CPU, before training
    trained: set[str]  # names of the parameters that trained
    full_precision: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def config(case: str, workdir: Path, instance_dir: str | Path, model: str = "offline", **over):
    from nbkit import TrainConfig

    kw = {**BASE, **CASES[case], **over}
    prompt = PROMPT.get(case, "a photo of zwx star")
    kw.setdefault("identifier", "<zwx>" if case in PROMPT else "zwx")
    return TrainConfig(model=model, instance_dir=str(instance_dir), output_dir=str(Path(workdir) / case),
                       class_dir=str(Path(workdir) / "class_images"), instance_prompt=prompt,
                       validation_prompts=[prompt], **kw)


def snapshot(parts) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p.detach().float().cpu().clone() for n in ("unet", "text_encoder", "vae")
            for k, p in getattr(parts, n).named_parameters()}


def run(case: str, workdir: Path, instance_dir: str | Path, model: str = "offline", embedding: Path | None = None,
        parts=None, **over) -> Facts:
    """Train one case; `embedding`: the learned word ti_dreambooth starts from (a TI case's result.saved)."""
    import nbkit
    from nbkit.export import formats as export

    parts = parts or nbkit.load_parts(model)
    if case == "ti_dreambooth":
        export.load_embedding(parts, embedding, "<zwx>")
    before = snapshot(parts)
    result = nbkit.train(config(case, workdir, instance_dir, model, **over), parts, progress=False)
    trained = {f"{n}.{k}" for n in ("unet", "text_encoder", "vae")
               for k, p in getattr(result.parts, n).named_parameters() if p.requires_grad}
    return Facts(case, result, before, trained, result.method.full_precision)


def check(f: Facts, device_kind: str = "T4") -> list[str]:
    """What a T4 user needs of a run, as a list of problems (empty: all good)."""
    r, problems = f.result, []
    info = r.info
    if info["precision"] != "fp16":
        problems.append(f"precision {info['precision']!r}, not fp16 ({device_kind} has no bf16)")
    if "8bit" not in info["optimizer"].replace("-", "").lower():
        problems.append(f"optimizer {info['optimizer']!r}, not 8-bit AdamW")
    if len(r.losses) != r.config.max_train_steps or not all(math.isfinite(x) for x in r.losses):
        problems.append(f"losses {r.losses}")
    scales = info["grad_scales"]
    if len(scales) != r.config.max_train_steps or not all(math.isfinite(s) and s > 0 for s in scales):
        problems.append(f"loss scales {scales} (a GradScaler should scale every step)")
    problems += _weights(f)
    problems += _samples(f)
    return problems


def _weights(f: Facts) -> list[str]:
    """Trained weights changed and in fp32; frozen ones bit-identical and in fp16 (fp32 in full-precision modules)."""
    problems, parts, changed = [], f.result.parts, 0
    ti = f.result.method.name == "textual_inversion"
    for n in ("unet", "text_encoder", "vae"):
        for k, p in getattr(parts, n).named_parameters():
            name, was = f"{n}.{k}", f.before.get(f"{n}.{k}")
            now = p.detach().cpu()
            if name in f.trained:
                if p.dtype != torch.float32:
                    problems.append(f"{name}: trains in {p.dtype}, not fp32")
                if ti:  # the table grew by the new token(s): old rows unchanged, new rows moved
                    ids = f.result.method.extra["token_ids"]
                    old = now[: was.shape[0]]
                    if not torch.equal(old.float(), was):
                        problems.append(f"{name}: {int((old.float() != was).any(1).sum())} other embedding rows moved")
                    init = was[parts.tokenizer.convert_tokens_to_ids(f.result.config.initializer_token)]
                    changed += int(not torch.equal(now[ids].float(), init.expand(len(ids), -1)))
                else:
                    changed += int(was is None or not torch.equal(now.float(), was))
                continue
            want = torch.float32 if n in f.full_precision else torch.float16
            if p.dtype != want:
                problems.append(f"{name}: frozen in {p.dtype}, not {want}")
            elif was is not None and not torch.equal(now, was.to(want)):
                problems.append(f"{name}: frozen, but changed")
    if not changed:
        problems.append("no trained weight changed")
    return problems


def _samples(f: Facts) -> list[str]:
    """Validation mid-run and class images made in fp16 without dtype errors; pictures, not NaN-black squares."""
    import numpy as np
    from PIL import Image

    problems, cfg = [], f.result.config
    grid = f.result.validation.get(cfg.max_train_steps)
    if not cfg.validation_steps:
        pass
    elif grid is None or not Path(grid).exists():
        problems.append("no validation grid at the last step")
    elif np.asarray(Image.open(grid)).std() < 1:
        problems.append(f"validation grid {grid} is one flat colour (NaN pictures?)")
    if cfg.with_prior_preservation:
        made = sorted(Path(cfg.class_dir).glob("class_*.png"))
        if len(made) < cfg.num_class_images:
            problems.append(f"{len(made)} class images in {cfg.class_dir}, wanted {cfg.num_class_images}")
    return problems


def check_export(f: Facts, out: Path) -> list[str]:
    """The run's take-home files in fp16, each reloaded and drawing the picture the model in memory draws."""
    from nbkit.export import takehome

    written = takehome.take_home(f.result, out, dtype="fp16", steps=4)
    problems = [f"{fmt}: {item.line()}" for fmt, item in written.items() if not item.ok]
    problems += [f"{fmt}: {item.note}" for fmt, item in written.items() if "DIFFER" in item.note]
    return problems


def main() -> int:
    import tempfile

    if not torch.cuda.is_available():
        os.environ["NBKIT_T4_REHEARSAL"] = "1"
    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        emb = None
        for case in CASES:
            f = run(case, Path(tmp), SAMPLE_INSTANCE_DIR, embedding=emb)
            emb = f.result.saved if case == "textual_inversion" else emb
            problems = check(f)
            failed += bool(problems)
            print(f"{case:22s} {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
