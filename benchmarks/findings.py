"""The course's claims, measured on the toy world: writes docs/findings.md.

    python -m benchmarks.findings            # ~15 min on 2 CPU cores (12 toy fine-tunes, each judged)
    python -m benchmarks.findings --quick    # fewer seeds and a shorter grid
    python -m benchmarks.findings --quick --only ema   # one experiment (EXPERIMENTS), merged into docs/findings.*
    python -m benchmarks.findings --quick --only schedulers   # the schedulers' noise remnants again

For each claim of the seeds (learning rate x steps, prior preservation, schedulers on an overfit model, training
the text encoder, textual inversion and TI -> DreamBooth, LoRA) this runs the toy experiment that tests it, scores
the pictures with the toy judge (nbkit.toy.judge) and says whether the claim held. The GPU-only claims (what fits in
16 GB) are measured by benchmarks/bench_memory.py and recorded in benchmarks/RESULTS.md.

Scores (share of pictures, fixed seeds): subject fidelity on "a photo of zwx star"; prompt fidelity on the subject
in new contexts (backgrounds its five pictures never showed); class drift on "a photo of a star" (does the plain
class now draw the subject?). "Balance" is min(subject fidelity, prompt fidelity): a model is only as good as the
weaker of the two.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nbkit import load_parts, pipeline
from nbkit.export import formats as export
from nbkit.models.offline import OFFLINE_BATCH_SIZE, offline_model_dir
from nbkit.notebook.sweep_pick import pick
from nbkit.notebook.sweep_spec import toy_grid
from nbkit.sample.compare import scheduler_grid
from nbkit.sample.noise import mean_high_frequency, reference_distance
from nbkit.sample.sampling import generate
from nbkit.toy import judge

from . import toy_results as tr

ROOT = Path(__file__).resolve().parent.parent
LORA_RATE = 20  # LoRA's rate as a multiple of the DreamBooth sweet spot's
TI_RATE, TI_STEPS = 1e-2, 4  # textual inversion: its own rate, for 4x the sweet spot's steps
# Schedulers on overfit models: the sweet-spot rate run long, and 4x hotter (the hottest corner of the grid)
SCHED = dict(names=("pndm", "lms", "ddim", "euler"), steps=(25, 50, 100), reference=("ddim", 250),
             overfit=((5e-4, 400), (2e-3, 400)), prompt="a photo of a zwx star on a purple background")


def settings(m: dict) -> dict[str, tuple[float, int]]:
    """(learning rate, steps) of each experiment, from the measured sweet spot and prior setting: what every
    notebook's offline defaults must be (tests/test_findings_defaults.py)."""
    slr, sst = m["sweet"]
    over = m["overfit"][0] if isinstance(m["overfit"][0], (list, tuple)) else m["overfit"]  # notebook 03's
    return {"sweet": (slr, sst), "prior": tuple(m["prior_setting"]), "overfit": tuple(over),
            "text_encoder": (slr, sst), "ti": (TI_RATE, TI_STEPS * sst), "ti_db": (slr / 2, sst),
            "lora": (LORA_RATE * slr, sst)}


def balance(s: dict) -> float:
    return min(s["subject_fidelity"], s["prompt_fidelity"])


def _size(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def ema(m: dict, work: Path) -> dict:
    """EMA (use_ema, diffusers' EMAModel): the DreamBooth sweet spot without and with it, same seeds."""
    runs = {k: tr.dreambooth(*m["sweet"], workdir=work, use_ema=k == "on") for k in ("off", "on")}
    return {"ema": {k: dict(tr.judge_run(r.pipeline("ddim"), m["seeds"]), seconds=r.seconds) for k, r in runs.items()}}


def schedulers(m: dict, work: Path) -> dict:
    """Each scheduler x steps on overfit models and, as a control, on the base model, the same seeds: high-frequency
    energy, distance to the seeds' DDIM 250-step pictures, and the judge's prompt fidelity; and how far PNDM's and
    LMS's own 250-step pictures are from that reference (how fair a DDIM reference is to them). Runs are keyed
    (learning rate, steps); the base model is (0, 0)."""
    names, steps, ref, prompt = SCHED["names"], SCHED["steps"], SCHED["reference"], SCHED["prompt"]
    seeds = m["seeds"]
    fid = lambda ims: judge.prompt_fidelity(ims, prompt, ("shape", "background"))  # noqa: E731
    runs = {}
    for lr, n in ((0, 0), *SCHED["overfit"]):
        pipe = tr.dreambooth(lr, n, workdir=work).pipeline("ddim") if n else pipeline(load_parts("offline"), "ddim")
        g = scheduler_grid(pipe, prompt, list(names), list(steps), list(range(seeds)), reference=ref, warmup=False,
                           progress=False)
        spread = {s: reference_distance(generate(pipe, prompt, seeds=g.seeds, steps=ref[1], scheduler=s),
                                        g.reference_images) for s in ("pndm", "lms")}
        runs[(lr, n)] = {"cells": {cell: {**g.measures[cell], "prompt_fidelity": fid(ims)}
                                   for cell, ims in g.images.items()},
                         "reference": {"high_frequency": mean_high_frequency(g.reference_images),
                                       "prompt_fidelity": fid(g.reference_images), "spread": spread}}
        del pipe, g
    return {"schedulers": {"prompt": prompt, "reference": ref, "runs": runs}, "overfit": list(SCHED["overfit"])}


# Experiments that also run alone (--only NAME), merged into an existing docs/findings.json: name -> f(results so
# far, work folder) -> new results. Each reads what it needs (the sweet spot, the seeds) from the results.
EXPERIMENTS = {"ema": ema, "schedulers": schedulers}


def grid(quick: bool) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The learning rates and steps measured: --quick measures the kit's toy grid, the one notebook 07 runs
    (configs/sweeps/toy_lr_steps.yaml); the full run a finer and longer one."""
    if quick:
        rates, steps = toy_grid().values()
        return tuple(rates), tuple(steps)
    return (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3), (100, 200, 400, 800)


def sweet_spot(curves: dict, base: dict):
    """The pick of notebook 07 (nbkit.notebook.sweep_pick.pick) over the grid {lr: {steps: scores}}."""
    rows = [{"run": f"{lr:g} x {n}", "LEARNING_RATE": lr, "STEPS": n, **s} for lr, c in curves.items()
            for n, s in c.items()]
    return pick(rows, base, rate_key="LEARNING_RATE", steps_key="STEPS").row


def measure(quick: bool = False, lrs=None, steps=None, work: Path | None = None) -> dict:
    """Run every experiment; return the raw results (also what the tests read)."""
    seeds = 8 if quick else 16
    lrs, steps = lrs or grid(quick)[0], steps or grid(quick)[1]
    work = Path(work or tempfile.mkdtemp(prefix="findings-"))
    out: dict = {"seeds": seeds, "t0": time.perf_counter()}
    base = load_parts("offline")
    from nbkit import pipeline

    base_pipe = pipeline(base, "ddim")
    out["follow"] = tr.base_prompt_following(base_pipe, n=24 if quick else 48)  # the base model follows prompts
    out["base"] = tr.judge_run(base_pipe, seeds)
    del base_pipe

    # 1. learning rate x steps: one constant-LR run per rate, judged at every step count of the grid
    out["grid"] = {lr: tr.dreambooth_curve(lr, steps, seeds, workdir=work) for lr in lrs}
    sweet = sweet_spot(out["grid"], out["base"])
    sweet_lr, sweet_steps = sweet["LEARNING_RATE"], sweet["STEPS"]
    hot_lr, hot_steps = max(lrs), max(steps)
    out["sweet"], out["hot"] = (sweet_lr, sweet_steps), (hot_lr, hot_steps)

    def db(**kw):
        r = tr.dreambooth(sweet_lr, sweet_steps, workdir=work, num_class_images=2 * seeds, **kw)
        return r, tr.judge_run(r.pipeline("ddim"), seeds)

    plain, out["plain"] = db()
    out["plain_seconds"], out["plain_bytes"] = plain.seconds, _size(plain.saved)

    # 2. prior preservation (and with the text encoder too), at the rate where drift shows fast
    def pair(**kw):
        r = tr.dreambooth(tr.PRIOR["lr"], tr.PRIOR["steps"], workdir=work, num_class_images=2 * seeds, **kw)
        return tr.judge_run(r.pipeline("ddim"), seeds)

    out["prior_setting"] = (tr.PRIOR["lr"], tr.PRIOR["steps"])
    out["no_prior"], out["prior"] = pair(), pair(prior=True)
    out["prior_te"] = pair(prior=True, train_text_encoder=True)

    # 3. schedulers on overfit models: noise measured (nbkit.sample.noise), with the EXPERIMENTS below

    # 4. the text encoder too (same rate and steps)
    _, out["text_encoder"] = db(train_text_encoder=True)

    # 5. textual inversion, then TI -> DreamBooth from the learned word
    run = settings(out)
    ti = tr.dreambooth(*run["ti"], workdir=work, method="textual_inversion", placeholder_token="<zwx>",
                       initializer_token="star", instance_prompt="a photo of <zwx> star")
    ti_pipe = ti.pipeline("ddim")
    out["ti"] = judge.scores(ti_pipe, identifier="<zwx>", seeds=seeds, **tr.SAMPLE)
    out["ti_seconds"], out["ti_bytes"] = ti.seconds, _size(ti.saved)
    parts = load_parts("offline")
    export.load_embedding(parts, ti.saved, "<zwx>")
    ti_db = tr.dreambooth(*run["ti_db"], workdir=work / "ti_db", instance_prompt="a photo of <zwx> star",
                          identifier="<zwx>", parts=parts)
    out["ti_db"] = judge.scores(ti_db.pipeline("ddim"), identifier="<zwx>", seeds=seeds, **tr.SAMPLE)

    # 6. LoRA: small adapters, a far higher rate (20x: the best of 5e-3 to 5e-2 tried on the toy model)
    lora = tr.dreambooth(*run["lora"], workdir=work, method="lora", lora_rank=8, save_dtype="fp16")
    out["lora"] = tr.judge_run(lora.pipeline("ddim"), seeds)
    out["lora_seconds"], out["lora_bytes"] = lora.seconds, _size(lora.saved)
    for experiment in EXPERIMENTS.values():
        out.update(experiment(out, work))
    out["settings"] = settings(out)  # (learning rate, steps) of each experiment, as run
    out["seconds"] = time.perf_counter() - out.pop("t0")
    shutil.rmtree(work, ignore_errors=True)
    return out


def verdicts(m: dict) -> list[tuple[str, str, str, bool]]:
    """(claim, what the kit measured, the setting, held?) for each claim."""
    pct = lambda x: f"{x:.0%}"  # noqa: E731
    rows = []
    (slr, sst), (hlr, hst) = m["sweet"], m["hot"]
    sweet, hot = m["grid"][slr][sst], m["grid"][hlr][hst]
    f = m["follow"]
    rows.append((
        "(toy world) The pretrained toy model follows prompts",
        f"shape and colour as asked {pct(f['shape_colour'])}, shape {pct(f['shape'])}, colour {pct(f['colour'])}, "
        f"background {pct(f['background'])}",
        "base model, one picture per prompt", f["shape_colour"] >= 0.7))
    rows.append((
        "DreamBooth overfits fast: there is a sweet spot of learning rate x steps",
        f"sweet spot (notebook 07's pick rule): balance {pct(balance(sweet))} at LR {slr:g} x {sst} steps "
        f"(subject {pct(sweet['subject_fidelity'])}, "
        f"new contexts {pct(sweet['prompt_fidelity'])}); the hottest cell, LR {hlr:g} x {hst}: new contexts "
        f"{pct(hot['prompt_fidelity'])}",
        f"grid below; UNet only, batch {OFFLINE_BATCH_SIZE}",
        balance(sweet) > balance(hot) and hot["prompt_fidelity"] < sweet["prompt_fidelity"]))
    dp, dw = m["no_prior"]["class_drift"], m["prior"]["class_drift"]
    plr, pst = m["prior_setting"]
    rows.append((
        "Prior preservation prevents language drift",
        f"class drift {pct(dp)} without, {pct(dw)} with (subject {pct(m['no_prior']['subject_fidelity'])} -> "
        f"{pct(m['prior']['subject_fidelity'])}); with the text encoder trained too: drift "
        f"{pct(m['prior_te']['class_drift'])}, subject {pct(m['prior_te']['subject_fidelity'])}",
        f"LR {plr:g} x {pst}, {2 * m['seeds']} class images made by the model", dw <= 0.5 * dp and dp > 0))
    rows.append(("On an overfit model DDIM with ~100 steps beats PNDM and LMS", *scheduler_verdict(m["schedulers"])))
    te = m["text_encoder"]
    rows.append((
        "Training the text encoder too gives the best results",
        f"balance {pct(balance(te))} with the text encoder, {pct(balance(m['plain']))} UNet only "
        f"(subject {pct(te['subject_fidelity'])}, new contexts {pct(te['prompt_fidelity'])})",
        f"LR {slr:g} x {sst}", balance(te) >= balance(m["plain"])))
    rows.append((
        "Textual inversion learns only an embedding: a tiny file",
        f"{m['ti_bytes'] / 1024:.1f} KB vs {m['plain_bytes'] / 2**20:.1f} MB for DreamBooth; subject "
        f"{pct(m['ti']['subject_fidelity'])}, new contexts {pct(m['ti']['prompt_fidelity'])}",
        f"LR 1e-2 x {4 * sst}", m["ti_bytes"] * 100 < m["plain_bytes"]))
    lo, hi = sorted((balance(m["ti"]), balance(m["plain"])))
    rows.append((
        "TI first, then DreamBooth, is a middle ground",
        f"balance: TI {pct(balance(m['ti']))}, TI -> DreamBooth {pct(balance(m['ti_db']))}, DreamBooth "
        f"{pct(balance(m['plain']))}",
        f"DreamBooth from the learned word at LR {slr / 2:g} x {sst}",
        lo <= balance(m["ti_db"]) or balance(m["ti_db"]) >= hi))
    rows.append((
        "LoRA trains small adapters: MB-sized files, fastest",
        f"{m['lora_bytes'] / 2**20:.2f} MB (fp16) vs {m['plain_bytes'] / 2**20:.1f} MB; {m['lora_seconds']:.0f} s vs "
        f"{m['plain_seconds']:.0f} s; balance {pct(balance(m['lora']))} vs {pct(balance(m['plain']))}",
        f"rank 8, LR {LORA_RATE * slr:g} x {sst}",
        m["lora_bytes"] * 4 < m["plain_bytes"] and m["lora_seconds"] < m["plain_seconds"]))
    if "ema" in m:
        rows.append(_ema_row(m))
    return rows


def _ema_row(m: dict) -> tuple[str, str, str, bool]:
    """The EMA claim; held: the balances differ by at most one seed's share of a score (noise at this many seeds)."""
    pct = lambda x: f"{x:.0%}"  # noqa: E731
    (slr, sst), on, off = m["sweet"], m["ema"]["on"], m["ema"]["off"]
    return (
        "EMA made no difference",
        f"balance {pct(balance(on))} with EMA, {pct(balance(off))} without (subject {pct(on['subject_fidelity'])} "
        f"vs {pct(off['subject_fidelity'])}, new contexts {pct(on['prompt_fidelity'])} vs "
        f"{pct(off['prompt_fidelity'])}, class drift {pct(on['class_drift'])} vs {pct(off['class_drift'])})",
        f"LR {slr:g} x {sst}, `use_ema=True` (diffusers' EMAModel: decay min(0.9999, n / (n + 9)) at update n, "
        f"{min(0.9999, sst / (sst + 9)):.3f} at the last)",
        abs(balance(on) - balance(off)) <= 1 / m["seeds"])


def _ddim_wins(run: dict, steps: int) -> dict[str, bool]:
    """Does DDIM beat both PNDM and LMS at `steps`: closer to the reference by more than PNDM's and LMS's own
    many-step pictures are from it, and 5 % less high-frequency energy?"""
    c, spread = run["cells"], max(run["reference"]["spread"].values())
    margin = {"distance": spread, "high_frequency": 0.05 * c[("ddim", steps)]["high_frequency"]}
    return {k: c[("ddim", steps)][k] + margin[k] < min(c[(o, steps)][k] for o in ("pndm", "lms")) for k in margin}


def _run_label(lr, n, capital: bool = False) -> str:
    return f"LR {lr:g} x {n}" if n else f"{'T' if capital else 't'}he base model (not fine-tuned)"


def scheduler_verdict(sc: dict) -> tuple[str, str, bool | str]:
    """(what was measured, the setting, held) for the schedulers claim: held (True) if DDIM at 100 steps beats PNDM
    and LMS on both measures on every overfit model; "partly" if it beats them on a measure somewhere; else False."""
    over = {k: r for k, r in sc["runs"].items() if k[1]}
    steps = sorted({k for _, k in next(iter(over.values()))["cells"]})
    lo, hi = steps[0], steps[-1]

    def fmt(run, key):
        return ", ".join(f"{s.upper()} {run['cells'][(s, lo)][key]:.3f} / {run['cells'][(s, hi)][key]:.3f}"
                         for s in ("ddim", "pndm", "lms"))

    what = "; ".join(
        f"{_run_label(*k)}: distance to the same seeds' {sc['reference'][0].upper()} {sc['reference'][1]}-step "
        f"pictures at {lo} / {hi} steps {fmt(r, 'distance')} (PNDM's and LMS's own {sc['reference'][1]}-step "
        f"pictures: up to {max(r['reference']['spread'].values()):.3f} from it), high-frequency energy "
        f"{fmt(r, 'high_frequency')}" for k, r in over.items())
    wins = [w for r in over.values() for n in steps for w in _ddim_wins(r, n).values()]
    held = all(all(_ddim_wins(r, hi).values()) for r in over.values()) or ("partly" if any(wins) else False)
    return what, "overfit models (" + ", ".join(_run_label(*k) for k in over) + f"), {sc['prompt']!r}", held


def scheduler_note(sc: dict) -> str:
    """The schedulers' bullet of "what the toy world does not show", from the figures."""
    runs = sc["runs"]
    over = {k: r for k, r in runs.items() if k[1]}
    steps = sorted({k for _, k in next(iter(over.values()))["cells"]})
    lo, hi = steps[0], steps[-1]
    mild, hot = min(over), max(over)
    d = lambda k, s, n=lo, key="distance": runs[k]["cells"][(s, n)][key]  # noqa: E731
    gap = lambda k: min(d(k, "pndm"), d(k, "lms")) - d(k, "ddim")  # noqa: E731  DDIM's lead at few steps
    hf_hi = sorted({round(d(k, s, hi, "high_frequency"), 3) for k in over for s in ("ddim", "pndm", "lms")})
    d_hi = max(d(k, s, hi) for k in over for s in ("ddim", "pndm", "lms"))
    base = (0, 0) in runs and gap((0, 0)) > 0
    return (
        "* **Schedulers**: the toy world shows DDIM ahead of PNDM and LMS at few steps, not noise that only DDIM at "
        f"~100 steps cleans up. At {lo} steps ({_run_label(*mild)}) DDIM's pictures are {d(mild, 'ddim'):.3f} from "
        f"the converged ({sc['reference'][1]}-step) picture, PNDM's {d(mild, 'pndm'):.3f} and LMS's "
        f"{d(mild, 'lms'):.3f}, with high-frequency energy {d(mild, 'pndm', lo, 'high_frequency'):.3f} / "
        f"{d(mild, 'lms', lo, 'high_frequency'):.3f} against DDIM's {d(mild, 'ddim', lo, 'high_frequency'):.3f}, and "
        f"the judge finds the prompt in {d(mild, 'lms', lo, 'prompt_fidelity'):.0%} of LMS's pictures. By {hi} steps "
        f"every one is within {d_hi:.3f} of the reference and their fine-grain energy is "
        + " to ".join(f"{v:.3f}" for v in hf_hi) + ", as the references' own ("
        + ", ".join(f"{r['reference']['high_frequency']:.3f}" for r in over.values())
        + (f"; the base model's {runs[(0, 0)]['reference']['high_frequency']:.3f}" if (0, 0) in runs else "")
        + "): an overfit model's own "
        "noise is in the picture every sampler converges to, and none removes it. Overfitting harder "
        f"({_run_label(*hot)}) shows {'more' if gap(hot) > gap(mild) else 'less, not more'} (at {lo} steps DDIM "
        f"{d(hot, 'ddim'):.3f}, PNDM {d(hot, 'pndm'):.3f}, LMS {d(hot, 'lms'):.3f})"
        + (", and the base model shows the same order (table above): in the toy world it is the samplers at few "
           "steps, not overfitting" if base else "") + ". SD 1.5 is where the study saw the claim, by eye; notebook 03 "
        "prints both measures for every cell there.")


def scheduler_section(sc: dict) -> list[str]:
    """A table per overfit run: distance / high-frequency energy / judge's prompt fidelity, scheduler x steps."""
    lines = ["## Schedulers on overfit models, and on the base model (distance to the reference / high-frequency "
             "energy / prompt fidelity)",
             "", f"Prompt {sc['prompt']!r}, the same seeds in every cell; reference: {sc['reference'][0].upper()} at "
             f"{sc['reference'][1]} steps; lower distance and energy = cleaner (nbkit.sample.noise).", ""]
    for (lr, n), run in sorted(sc["runs"].items()):
        steps = sorted({k for _, k in run["cells"]})
        ref = run["reference"]
        lines += [f"**{_run_label(lr, n, True)}**: the reference's energy {ref['high_frequency']:.3f}, prompt fidelity "
                  f"{ref['prompt_fidelity']:.0%}; PNDM's and LMS's own {sc['reference'][1]}-step pictures are " +
                  ", ".join(f"{v:.3f}" for v in ref["spread"].values()) + " from it.", "",
                  "| scheduler | " + " | ".join(f"{k} steps" for k in steps) + " |", "|---|" + "---|" * len(steps)]
        for s in dict.fromkeys(s for s, _ in run["cells"]):
            lines.append(f"| {s} | " + " | ".join(
                "{distance:.3f} / {high_frequency:.3f} / {prompt_fidelity:.0%}".format(**run["cells"][(s, k)])
                for k in steps) + " |")
        lines.append("")
    return lines


def ema_note(m: dict) -> str:
    on, off, (slr, sst) = m["ema"]["on"], m["ema"]["off"], m["sweet"]
    same = all(on[k] == off[k] for k in ("subject_fidelity", "prompt_fidelity", "class_drift"))
    return (f"* **EMA** (`use_ema=True`) {'changed no score' if same else 'changed the scores little'} at the sweet "
            f"spot (LR {slr:g} x {sst}; subject {on['subject_fidelity']:.0%} vs {off['subject_fidelity']:.0%} without, "
            f"new contexts {on['prompt_fidelity']:.0%} vs {off['prompt_fidelity']:.0%}, drift {on['class_drift']:.0%} "
            f"vs {off['class_drift']:.0%}): in a {sst}-step fine-tune diffusers' warm-up keeps the decay under "
            f"{min(0.9999, sst / (sst + 9)):.2f}, so the average is mostly of the run's last fifth. It costs one more "
            "fp32 copy of the trained weights (3.2 GiB for SD 1.5's UNet). Not measured on SD 1.5.")


def notes(m: dict) -> list[str]:
    """What the toy world does not show (yet), with the figures that say so."""
    pct = lambda x: f"{x:.0%}"  # noqa: E731
    nop, pri, pte, slr = m["no_prior"], m["prior"], m["prior_te"], m["sweet"][0]
    plr, pst = m["prior_setting"]
    return [
        "## What the toy world does not show (yet)", "",
        scheduler_note(m["schedulers"]),
        f"* **Prior preservation in a short run, UNet only**, costs most of the subject "
        f"({pct(nop['subject_fidelity'])} -> {pct(pri['subject_fidelity'])} at LR {plr:g} x {pst}): the class term "
        "pulls the same UNet weights back toward the class. With the text encoder trained too, the identifier itself "
        f"carries the subject and both hold (subject {pct(pte['subject_fidelity'])}, drift {pct(pte['class_drift'])}): "
        "the course's recommended recipe.",
        f"* **Textual inversion** cannot learn the subject's stripes (subject {pct(m['ti']['subject_fidelity'])}): an "
        "embedding can only point at something the model can already draw, and no pretraining scene had a pattern. "
        f"TI first, then DreamBooth from the learned word, does learn it ({pct(m['ti_db']['subject_fidelity'])}).",
        f"* **LoRA** (rank 8 on the UNet's attention) learns the subject only partly on the toy UNet (balance "
        f"{pct(balance(m['lora']))} at LR {LORA_RATE * slr:g}, the best of 5e-3 to 5e-2 tried, with or without "
        "text-encoder adapters): the tiny UNet likely draws colour and pattern in its convolutions, which attention "
        f"adapters do not reach. Its file is {m['plain_bytes'] / m['lora_bytes']:.0f}x smaller and its steps faster.",
        *([ema_note(m)] if "ema" in m else []),
        "",
        "How the toy model got here (issue 3): fine-tunes at 4 pictures per step (at 1, the subject's orange came out "
        "yellow: subject 31-38 %), with the offset noise and min-SNR weighting it was pretrained with "
        "(`noise_offset=\"auto\"`), and a model pretrained longer with a cool-down and with made-up *names* in its "
        "captions (`toyworld.NAMES`), so that an identifier it never saw is not read as a mere \"a\".", ""]



def markdown(m: dict, quick: bool) -> str:
    rows = verdicts(m)
    lines = [
        "# Findings: the course's claims, measured",
        "",
        f"Made by `python -m benchmarks.findings{' --quick' if quick else ''}` on {m.get('date', _today())} in "
        f"{m['seconds'] / 60:.0f} min" + "".join(f"; `--only {','.join(u['only'])}` added on {u['date']} in "
                                                   f"{u['seconds'] / 60:.0f} min" for u in m.get("updates", []))
        + f" on {platform.machine()} ({m.get('threads', torch.get_num_threads())} torch threads, a 2-core "
        f"CPU machine), model `{offline_model_dir().name}`, judge `data/judge/`, {m['seeds']} seeds per prompt, "
        f"DDIM {tr.SAMPLE['steps']} steps unless said. The toy world shows the *shape* of each finding on a CPU; "
        "the numbers for SD 1.5 on a GPU come from running the notebooks there (notebook 07 sweeps them).",
        "",
        "| claim (the seeds) | measured here | setting | held? |",
        "|---|---|---|---|",
        *[f"| {c} | {w} | {s} | {ok if isinstance(ok, str) else 'yes' if ok else '**no**'} |" for c, w, s, ok in rows],
        "",
        "## Learning rate x steps (subject fidelity / new-context fidelity / class drift)",
        "",
        "| LR \\ steps | " + " | ".join(str(n) for n in next(iter(m["grid"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(m["grid"].values()))),
    ]
    for lr, curve in m["grid"].items():
        lines.append(f"| {lr:g} | " + " | ".join(
            f"{s['subject_fidelity']:.0%} / {s['prompt_fidelity']:.0%} / {s['class_drift']:.0%}"
            for s in curve.values())
            + " |")
    lines += ["", f"Base model (no fine-tune): subject {m['base']['subject_fidelity']:.0%}, new contexts "
              f"{m['base']['prompt_fidelity']:.0%}, class drift {m['base']['class_drift']:.0%}.", "",
              "## Memory (GPU claims)", "",
              "8-bit Adam, fp16, gradient checkpointing and accumulation making DreamBooth + text encoder fit 16 GB, "
              "and DeepSpeed CPU offload for 8 GB: predicted by `nbkit.memory.planner` and measured by "
              "`benchmarks/bench_memory.py`; see [benchmarks/RESULTS.md](../benchmarks/RESULTS.md) (GPU figures are "
              "recorded there when a GPU run has been made).", "", *scheduler_section(m["schedulers"])]
    return "\n".join(lines + notes(m))


def _today() -> str:
    return time.strftime("%Y-%m-%d")


def _jsonable(x):
    """measure()'s figures as JSON: every key a string ("('ddim', 25)", "0.0005"), at every depth."""
    return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in x.items()} if isinstance(x, dict) else x


def _restore(x):
    """The JSON figures back as measure() returns them: keys that read as Python numbers or tuples become those."""
    def key(k):
        try:
            v = ast.literal_eval(k)
        except (ValueError, SyntaxError):
            return k
        return v if isinstance(v, (int, float, tuple)) else k

    return {key(k): _restore(v) for k, v in x.items()} if isinstance(x, dict) else x


def load(out: Path) -> dict:
    """The results in out's .json as `measure` returned them (`write(load(out), quick, out)` re-renders them)."""
    m = _restore(json.loads(out.with_suffix(".json").read_text()))
    made = re.search(r" on (\d{4}-\d{2}-\d{2}) in ", out.read_text()) if out.is_file() else None
    m.setdefault("date", made.group(1) if made else "an earlier date")
    return m


def merge(names: list[str], out: Path, quick: bool) -> dict:
    """Run only the experiments `names` and merge them into the results in out's .json (the rest kept as is)."""
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not out.with_suffix(".json").is_file():
        raise SystemExit(f"--only: {unknown} not among {sorted(EXPERIMENTS)}" if unknown else
                         f"--only needs {out.with_suffix('.json')}: run the whole benchmark once first.")
    m = load(out)
    if (m["seeds"] == 8) != quick:
        raise SystemExit(f"{out.with_suffix('.json')} has {m['seeds']} seeds: pass --quick as it was made "
                         f"({'with' if m['seeds'] == 8 else 'without'} --quick).")
    t0, work = time.perf_counter(), Path(tempfile.mkdtemp(prefix="findings-"))
    for name in names:
        m.update(EXPERIMENTS[name](m, work))
    shutil.rmtree(work, ignore_errors=True)
    m["updates"] = [u for u in m.get("updates", []) if u["only"] != names] + [
        {"only": names, "date": _today(), "seconds": time.perf_counter() - t0}]
    return m


def write(m: dict, quick: bool, out: Path) -> str:
    """docs/findings.md (keeping the hand-written sections of the one there) and the raw figures in .json."""
    text = markdown(m, quick)
    old = out.read_text() if out.is_file() else ""
    for section in re.split(r"\n(?=## )", old)[1:]:
        if section.splitlines()[0] not in text:
            text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    raw = _jsonable(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))  # the raw figures
    out.write_text(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.findings", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help=f"comma-separated experiments to run alone and merge: {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", default=str(ROOT / "docs" / "findings.md"))
    a = p.parse_args(argv)
    out = Path(a.out)
    m = merge(a.only.split(","), out, a.quick) if a.only else {**measure(a.quick), "date": _today()}
    print(write(m, a.quick, out))


if __name__ == "__main__":
    main()
