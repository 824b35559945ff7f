"""What the pretrained toy model knows, and what DreamBooth does to it, measured by the toy judge.

    python -m benchmarks.toy_results            # prints the tables, writes docs/toy_results.md (~15 min on 2 cores)
    python -m benchmarks.toy_results --quick    # fewer samples and runs

Rows: the base model follows prompts; DreamBooth from the sample subject's 5 pictures across learning rates and
steps (the sweet-spot grid), without and with prior preservation. Columns: subject fidelity on
"a photo of zwx star", prompt fidelity on the subject in new contexts (backgrounds its pictures never showed),
class drift on "a photo of a star", and the seconds the fine-tune took. tests/test_toyworld.py asserts the
same quantities with margins, on fewer samples.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nbkit import load_parts, pipeline
from nbkit.config import TrainConfig
from nbkit.models.offline import NEW_CONTEXTS, OFFLINE_BATCH_SIZE, SAMPLE_INSTANCE_DIR, offline_model_dir
from nbkit.sample.sampling import generate
from nbkit.toy import judge
from nbkit.toy import world as toyworld
from nbkit.training.loop import train

ROOT = Path(__file__).resolve().parent.parent
SUBJECT, CLASS_NOUN = "zwx", "star"
INSTANCE_PROMPT = f"a photo of {SUBJECT} {CLASS_NOUN}"
CLASS_PROMPT = f"a photo of a {CLASS_NOUN}"
SAMPLE = dict(steps=20, guidance=7.5, scheduler="ddim")  # how every measured picture is drawn
# The prior-preservation comparison: a rate where drift shows within 200 steps. With the class term in every step
# the subject needs a higher rate than alone (measured: docs/findings.md).
PRIOR = dict(lr=5e-4, steps=200)


def prompt_set(n: int, seed: int = 0) -> list[str]:
    """`n` full prompts of the world's grammar (colour, shape, background), spread over every shape and colour."""
    rng = random.Random(seed)
    combos = list(itertools.product(toyworld.SHAPES, toyworld.COLOURS))
    rng.shuffle(combos)
    out = []
    for shape, colour in (combos * (n // len(combos) + 1))[:n]:
        bg = rng.choice([b for b in toyworld.BACKGROUNDS if b != colour])
        out.append(f"a photo of a {colour} {shape} on a {bg} background")
    return out


def base_prompt_following(pipe, n: int = 48, seed: int = 0) -> dict[str, float]:
    """Share of base-model images whose shape and colour (and background) the judge finds as the prompt says."""
    prompts = prompt_set(n, seed)
    images = [generate(pipe, p, seeds=[seed * 1000 + i], **SAMPLE)[0] for i, p in enumerate(prompts)]
    seen = judge.predict(images)
    return {
        "shape_colour": sum(judge.matches(s, p, ("shape", "colour")) for s, p in zip(seen, prompts)) / n,
        "shape_colour_background": sum(judge.matches(s, p) for s, p in zip(seen, prompts)) / n,
        "shape": sum(judge.matches(s, p, ("shape",)) for s, p in zip(seen, prompts)) / n,
        "colour": sum(judge.matches(s, p, ("colour",)) for s, p in zip(seen, prompts)) / n,
        "background": sum(judge.matches(s, p, ("background",)) for s, p in zip(seen, prompts)) / n,
    }


def dreambooth(lr: float, steps: int, prior: bool = False, workdir: Path | None = None, num_class_images: int = 16,
               seed: int = 0, instance_dir: Path = SAMPLE_INSTANCE_DIR, parts=None, **overrides):
    """One toy fine-tune on the sample subject (DreamBooth of the UNet at the toy batch size unless `overrides` say
    otherwise, e.g. method="lora"), in a fresh output folder, from `parts` (default: the offline model); returns the
    TrainResult."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="toydb-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix=f"db-{lr:g}-{steps}-{int(prior)}-", dir=workdir)  # never resumes another run
    overrides = {"method": "dreambooth", "instance_prompt": INSTANCE_PROMPT, "identifier": SUBJECT,
                 "train_batch_size": OFFLINE_BATCH_SIZE,
                 "checkpointing_steps": 0, "validation_steps": 0, "sample_steps": SAMPLE["steps"], **overrides}
    cfg = TrainConfig(
        model="offline", instance_dir=str(instance_dir), output_dir=run_dir, resolution=64,
        max_train_steps=steps, learning_rate=lr, seed=seed,
        with_prior_preservation=prior, class_prompt=CLASS_PROMPT if prior else "",
        class_dir=str(workdir / "class") if prior else "", num_class_images=num_class_images, **overrides,
    )
    return train(cfg, parts or load_parts("offline"), progress=False)


def judge_run(pipe, seeds: int = 12) -> dict[str, float]:
    """The three judge scores of a pipeline (subject, new contexts, class prompt), from seeds 0..seeds-1."""
    return judge.scores(pipe, identifier=SUBJECT, class_noun=CLASS_NOUN, seeds=seeds, **SAMPLE)


JUDGED_PROMPTS = [INSTANCE_PROMPT] + [f"a photo of a {SUBJECT} {CLASS_NOUN} on a {bg} background"
                                      for bg in NEW_CONTEXTS] + [CLASS_PROMPT]


def scores_from_grid(path: Path, seeds: int) -> dict[str, float]:
    """Judge a validation grid of JUDGED_PROMPTS (one row per prompt, one column per seed)."""
    from PIL import Image

    g = Image.open(path)
    tiles = [[g.crop((c * 64, r * 64, c * 64 + 64, r * 64 + 64)) for c in range(seeds)]
             for r in range(len(JUDGED_PROMPTS))]
    ctx = [im for row in tiles[1:-1] for im in row]
    ctx_prompts = [p for p in JUDGED_PROMPTS[1:-1] for _ in range(seeds)]
    return judge.scores({"subject": tiles[0], "context": (ctx, ctx_prompts), "class": tiles[-1]})


def dreambooth_curve(lr: float, steps: tuple[int, ...], seeds: int, prior: bool = False, workdir: Path | None = None,
                     **kw) -> dict[int, dict[str, float]]:
    """One run to max(steps) that draws the judged prompts at every step of `steps` (its validation grids).

    The learning rate is constant, so the model at step n of this run is the model of an n-step run.
    """
    every = min(steps) if all(s % min(steps) == 0 for s in steps) else 1
    r = dreambooth(lr, max(steps), prior, workdir, validation_prompts=JUDGED_PROMPTS, validation_steps=every,
                   num_validation_images=seeds, guidance_scale=SAMPLE["guidance"],
                   sample_scheduler=SAMPLE["scheduler"], **kw)
    per_step = r.seconds / max(steps)  # includes validation: an upper bound of the training time
    return {n: dict(scores_from_grid(r.validation[n], seeds), seconds=round(per_step * n)) for n in steps}


def run(quick: bool = False, out: Path | None = ROOT / "docs" / "toy_results.md") -> str:
    t0 = time.perf_counter()
    seeds = 8 if quick else 16
    grid_lrs = (1e-4, 1e-3) if quick else (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3)
    grid_steps = (100, 200, 400) if quick else (100, 200, 400, 800)
    base = load_parts("offline")
    pipe = pipeline(base, SAMPLE["scheduler"])
    follow = base_prompt_following(pipe, n=24 if quick else 96)
    rows = [("base model (no fine-tune)", "-", "-", judge_run(pipe, seeds), 0.0)]
    print(_row(*rows[-1]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="toy-results-"))
    try:
        for lr in grid_lrs:
            for n, s in dreambooth_curve(lr, grid_steps, seeds, workdir=work).items():
                rows.append(("DreamBooth", f"{lr:g}", n, s, s.pop("seconds")))
                print(_row(*rows[-1]), flush=True)
        best = max(rows[1:], key=lambda r: (min(r[3]["subject_fidelity"], r[3]["prompt_fidelity"]), -r[2]))
        lr, steps = float(best[1]), best[2]
        for prior in (False, True):
            r = dreambooth(lr, steps, prior=prior, workdir=work)
            label = "DreamBooth + prior preservation" if prior else "DreamBooth (timed alone)"
            rows.append((label, f"{lr:g}", steps, judge_run(r.pipeline("ddim"), seeds), r.seconds))
            print(_row(*rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = _markdown(follow, rows, best, seeds, time.perf_counter() - t0, quick)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def _row(name, lr, steps, s, seconds) -> str:
    return (f"| {name} | {lr} | {steps} | {s['subject_fidelity']:.0%} | {s['prompt_fidelity']:.0%} | "
            f"{s['class_drift']:.0%} | {seconds:.0f} |")


def _markdown(follow, rows, best, seeds, seconds, quick) -> str:
    head = ("| run | LR | steps | subject fidelity | prompt fidelity (new contexts) | class drift | seconds |\n"
            "|---|---|---|---|---|---|---|")
    return f"""# The toy world, measured

Made by `python -m benchmarks.toy_results{' --quick' if quick else ''}` in {seconds / 60:.0f} min on
{platform.machine()} with {torch.get_num_threads()} torch threads (a shared 2-core machine), model
`{offline_model_dir().name}`, judge `data/judge/`. Pictures: DDIM, {SAMPLE['steps']} steps, guidance
{SAMPLE['guidance']}, fixed seeds; {seeds} per prompt.

## The base model follows prompts

{len(prompt_set(24 if quick else 96))} prompts "a photo of a <colour> <shape> on a <background> background",
one image each; share the judge reads as asked:

| shape and colour | shape, colour and background | shape | colour | background |
|---|---|---|---|---|
| {follow['shape_colour']:.0%} | {follow['shape_colour_background']:.0%} | {follow['shape']:.0%} | \
{follow['colour']:.0%} | {follow['background']:.0%} |

## DreamBooth on the sample subject (5 pictures of `zwx star`, UNet only, batch 1)

Subject fidelity: "{INSTANCE_PROMPT}" shows the orange star with blue stripes. Prompt fidelity: "a photo of a zwx
star on a <green|purple> background" shows a star on that background (the pictures only showed white, yellow,
black). Class drift: "{CLASS_PROMPT}" shows the subject's stripes.

{head}
""" + "\n".join(_row(*r) for r in rows) + f"""

Sweet spot (best of min(subject, prompt fidelity)): LR {best[1]}, {best[2]} steps.
"""


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toy_results", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "toy_results.md"))
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.quick, Path(a.out) if a.out else None)


if __name__ == "__main__":
    main()
