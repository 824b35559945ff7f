"""Scores while training: metrics.json, the best model so far, and a clear word when the run starts to overfit.

Every `eval_steps` (and before the first step, and at the last) the training loop hands the model to a Tracker,
which draws fixed-seed pictures, scores them (nbkit.scores.evaluate), appends a row to `metrics.json`:

    {"step": 200, "subject_fidelity": 0.75, "prompt_fidelity": 0.62, "class_drift": 0.1, "tradeoff": 0.68,
     "class_diversity": 0.4, ..., "scorer": "toy judge", "seconds": 3.1}

and keeps the best model: the one with the highest `tradeoff`, the harmonic mean of subject and prompt fidelity
(high only when the model both draws the subject and follows the prompt; step 0, the untrained model, is a
baseline and never "best"). When it improves, the model is written to `best/` (LoRA and TI: their small files;
DreamBooth: a whole diffusers folder with the trained weights in full precision), with `best.json` saying which
step it is; `best_pipeline(result)` loads it to sample. Once the trade-off, averaged over the last three
evaluations (a few fixed-seed pictures are noisy), has fallen more than 20% below its peak, it says so, once: the
run has started to overfit.

The rows and the best model survive an interrupted run: they travel in the checkpoint (nbkit.training.checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nbkit.safeio import atomic_write, swap_folder
from nbkit.scores import concepts, evaluate

METRICS_FILE = "metrics.json"
BEST_DIR = "best"
BEST_INFO = "best.json"
SCORES = ("subject_fidelity", "prompt_fidelity", "class_drift", "tradeoff")


def best_row(rows: list[dict]) -> dict | None:
    """The evaluated step with the highest trade-off (the earliest of equals); step 0 is a baseline only."""
    trained = [r for r in rows if r["step"] > 0]
    return max(trained, key=lambda r: r["tradeoff"]) if trained else None  # max keeps the first of equals


def smoothed(rows: list[dict], window: int = 3) -> list[dict]:
    """Each trained step's scores averaged with the evaluations before it (`window` in all): the trend, not the
    noise of a few fixed-seed pictures."""
    trained = [r for r in rows if r["step"] > 0]
    out = []
    for i, r in enumerate(trained):
        w = trained[max(0, i - window + 1):i + 1]
        out.append({"step": r["step"], **{k: sum(x[k] for x in w) / len(w) for k in SCORES}})
    return out


def overfit(rows: list[dict], margin: float = 0.2, window: int = 3) -> dict | None:
    """Where the run started to overfit: the smoothed trade-off (see smoothed()) fell more than `margin` (a
    fraction of its peak) below its peak. Returns {"step", "peak", "now"} (smoothed rows) or None."""
    peak = None
    for r in smoothed(rows, window):
        if peak is None or r["tradeoff"] > peak["tradeoff"]:
            peak = r
        elif peak["tradeoff"] > 0 and r["tradeoff"] < (1 - margin) * peak["tradeoff"]:
            return {"step": r["step"], "peak": peak, "now": r, "window": window}
    return None


def overfit_message(point: dict, best: dict | None) -> str:
    """The sentence a student reads when the run starts to overfit."""
    p, n = point["peak"], point["now"]

    def moved(key, name):
        a, b = p[key], n[key]
        return f"{name} stayed at {b:.2f}" if round(a, 2) == round(b, 2) else \
            f"{name} {'fell' if b < a else 'rose'} from {a:.2f} to {b:.2f}"

    first, second = (("prompt_fidelity", "prompt fidelity"), ("subject_fidelity", "subject fidelity"))
    if n["subject_fidelity"] - p["subject_fidelity"] < n["prompt_fidelity"] - p["prompt_fidelity"]:
        first, second = second, first  # lead with what fell most
    where = (f"in {best['path']}" if best and best.get("path") else
             "(keep_best=True saves it)" if best else "")
    return (f"The run has started to overfit at step {point['step']}: {moved(*first)} while {moved(*second)} "
            f"(class drift {p['class_drift']:.2f} -> {n['class_drift']:.2f}; averages of the last "
            f"{point.get('window', 1)} evaluations, step {p['step']} vs {n['step']}). The best model so far is step "
            f"{(best or p)['step']} {where}".rstrip() + ". More steps will not help: lower the learning rate or "
            "the steps, or use that model.")


def table(rows: list[dict]) -> str:
    """The scored steps of a run as a text table, best step marked (rows of metrics.json)."""
    cols = (("subject_fidelity", "subject"), ("prompt_fidelity", "prompt"), ("class_drift", "class drift"),
            ("tradeoff", "balance"))
    best = best_row(rows)
    lines = ["  step | " + " | ".join(name.rjust(11) for _, name in cols)]
    for r in rows:
        mark = "  <- best" if best is not None and r["step"] == best["step"] else ""
        lines.append(f"{r['step']:6d} | " + " | ".join(f"{r.get(k, float('nan')):11.2f}" for k, _ in cols) + mark)
    scorer = rows[0].get("scorer") if rows else None
    return "\n".join(lines + ([f"(scored by the {scorer}; balance = harmonic mean of subject and prompt fidelity)"]
                              if scorer else []))


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def read_metrics(out: str | Path) -> list[dict]:
    """The rows of a run's metrics.json (a run folder or the file); [] when the run was not scored."""
    path = Path(out) / METRICS_FILE if Path(out).is_dir() else Path(out)
    return json.loads(path.read_text()) if path.is_file() else []


def read_best(out: str | Path) -> dict | None:
    """best/best.json of a run folder (None when there is none)."""
    path = Path(out) / BEST_DIR / BEST_INFO
    return json.loads(path.read_text()) if path.is_file() else None


def best_pipeline(run, scheduler: str = "ddim", device: str | None = "auto"):
    """The best model of a run as a pipeline, ready to sample: `run` is a TrainResult or the run's output folder.

    DreamBooth: best/ is a whole diffusers folder; LoRA and TI: their file on the base model named in best.json."""
    from diffusers import StableDiffusionPipeline

    from nbkit.models.parts import load_parts, pipeline
    from nbkit.sample.sampling import set_scheduler

    out = Path(getattr(run, "output_dir", run))
    info = read_best(out)
    if not info or not info.get("path"):
        raise FileNotFoundError(f"{out} has no saved best model ({BEST_DIR}/{BEST_INFO}): train with eval_steps > 0 "
                                "and keep_best=True.")
    path = Path(info["path"])
    if info.get("method") == "dreambooth" or (path / "model_index.json").exists():
        pipe = set_scheduler(StableDiffusionPipeline.from_pretrained(path), scheduler)
        pipe.set_progress_bar_config(disable=True)
        device = ("cuda" if torch.cuda.is_available() else None) if device == "auto" else device
        return pipe.to(device) if device else pipe
    pipe = pipeline(load_parts(info["base_model"]), scheduler, device=device)
    if info.get("method") == "lora":
        pipe.load_lora_weights(path.parent, weight_name=path.name)
    else:
        pipe.load_textual_inversion(path, token=info.get("placeholder_token"))
    return pipe


def model_saver(cfg, parts, method) -> Callable[[Path], Path]:
    """How to write the model in training into a folder without disturbing the run; returns what it wrote.

    LoRA and TI: the method's own small files. DreamBooth: the pipeline's save_pretrained as the parts are, so the
    trained weights stay in full precision (a cast to fp16 and back would round the weights being trained)."""
    if method.name != "dreambooth":
        return lambda folder: method.save(parts, folder)

    def save(folder: Path) -> Path:
        from nbkit.models.parts import pipeline

        pipeline(parts, cfg.sample_scheduler, device=None).save_pretrained(folder, safe_serialization=True)
        return folder

    return save


@dataclass
class Tracker:
    """Scores the model at each evaluation, writes metrics.json, keeps best/, warns once about overfitting."""

    evaluator: evaluate.Evaluator
    out: Path  # the run's output folder
    save: Callable[[Path], Path] | None = None  # writes the model into a folder (None: do not keep the best)
    rows: list[dict] = field(default_factory=list)
    best: dict | None = None  # best.json: step, scores, path
    overfit_at: int | None = None  # the step the overfit warning named (it is given once)
    margin: float = 0.2  # see overfit()
    window: int = 3
    about: dict = field(default_factory=dict)  # written into best.json: method, base model, TI token

    @classmethod
    def for_training(cls, cfg, parts, method, out: Path, verbose: bool = True) -> Tracker | None:
        """The tracker of a training run: its evaluator (nbkit.scores.evaluate.for_run) and how to save its model.

        None, said once, when the pictures are valid but no scorer can read them (evaluate.Unscorable: ordinary
        photos on the offline toy model): the run trains unscored. Decided: no metrics.json and no best/ then, not
        a best model kept by loss (the training loss keeps falling as a run overfits: the lowest-loss step would be
        the most overfit one). A scorer that cannot be loaded (EvaluatorUnavailable) still stops the run
        before it starts, as it can be fixed (a download, a folder) and the run would otherwise lose its numbers."""
        try:
            ev = run_evaluator(cfg, parts, verbose)
        except evaluate.Unscorable as err:
            print(f"This run is not scored: {err}. It trains all the same (eval_steps={cfg.eval_steps} is ignored): "
                  f"no {METRICS_FILE} and no {BEST_DIR}/; judge it by its validation pictures and the final model.")
            _drop_earlier_scores(Path(out))
            return None
        about = {"method": method.name, "base_model": parts.source, "placeholder_token":
                 cfg.placeholder_token if method.name == "textual_inversion" else None}
        return cls(ev, Path(out), model_saver(cfg, parts, method) if cfg.keep_best else None, about=about)

    def restore(self, rows: list[dict], best: dict | None, fresh: bool) -> None:
        """Continue from a checkpoint's rows (fresh=False) or start a new run (fresh=True: an earlier run's best/
        in the same folder is removed). On resume the best/ on disk is the truth: it may be newer than the
        checkpoint (the run stopped between the two), and the resumed run replaces it only with a better one."""
        best_dir = self.out / BEST_DIR
        if fresh:
            if (best_dir / BEST_INFO).is_file():
                print(f"Starting a new run: the best model of an earlier run in {best_dir} is removed.")
                shutil.rmtree(best_dir)
            self.rows, self.best = [], None
        else:
            self.rows, self.best = list(rows), read_best(self.out) or best
        point = overfit(self.rows, self.margin, self.window)
        self.overfit_at = point["step"] if point else None  # already said in the earlier session

    def update(self, step: int, pipe) -> dict:
        """Score the model at `step`, record the row, keep the best, warn about overfitting; return the row."""
        t = time.perf_counter()
        scores = self.evaluator.score(pipe)
        row = {"step": step, **{k: round(float(v), 5) for k, v in scores.items()}, "scorer": self.evaluator.name}
        self.rows = [r for r in self.rows if r["step"] < step] + [row]  # a step scored again replaces its row
        if step > 0 and (self.best is None or row["tradeoff"] > self.best["tradeoff"]):
            self._keep(row)
        row["seconds"] = round(time.perf_counter() - t, 3)
        _write_json(self.out / METRICS_FILE, self.rows)
        if self.overfit_at is None:
            point = overfit(self.rows, self.margin, self.window)
            if point:
                self.overfit_at = point["step"]
                print(overfit_message(point, self.best))
        return row

    def _keep(self, row: dict) -> None:
        """The best so far: remember it; with a saver, write the model to best/ (atomically: a new folder, then a
        rename, so a stop at any moment leaves the previous best whole)."""
        each = {k: v for k, v in row.items() if k.partition(concepts.SEP)[2] in SCORES}  # several subjects' own
        info = {k: row[k] for k in ("step", *SCORES)} | each
        if self.save is not None:
            final, tmp = self.out / BEST_DIR, self.out / f".{BEST_DIR}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            written = Path(self.save(tmp))
            info["path"] = str(final / written.relative_to(tmp)) if written != tmp else str(final)
            info.update(self.about)
            _write_json(tmp / BEST_INFO, info)
            swap_folder(tmp, final, self.out / f".{BEST_DIR}.old{os.getpid()}")
        self.best = info

    def state(self) -> dict:
        """What a checkpoint keeps of the tracker."""
        return {"metrics": self.rows, "best": self.best}

    def summary(self) -> str:
        b = self.best
        if not b:
            return "No trained step was scored."
        each = "".join(f"; {word}: subject {s['subject_fidelity']:.2f}, prompt {s['prompt_fidelity']:.2f}"
                       for word, s in concepts.per_concept(b).items())  # several subjects: each one's
        return (f"Best model: step {b['step']} (subject fidelity {b['subject_fidelity']:.2f}, prompt fidelity "
                f"{b['prompt_fidelity']:.2f}, class drift {b['class_drift']:.2f}{each})" +
                (f", saved in {b['path']}." if b.get("path") else "."))


def _drop_earlier_scores(out: Path) -> None:
    """An unscored run's folder must not show an earlier run's metrics.json and best/ as its own (they cannot be
    this run's: a resumed run has the same pictures, so it was unscored before too)."""
    stale = [p for p in (out / METRICS_FILE, out / BEST_DIR) if p.exists()]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if stale:
        print(f"Removed an earlier run's scores from {out}: {', '.join(p.name for p in stale)}.")


def run_evaluator(cfg, parts, verbose: bool = True):
    """How a run with these settings is scored: evaluate.for_run on its subject; with several subjects (concepts_list)
    one evaluator each, combined (nbkit.scores.concepts.Combined: each subject scored on its own, and their mean)."""
    evs = {}
    for c in cfg.concepts():
        one = dataclasses.replace(cfg, concepts_list=[], instance_dir=c.instance_dir, instance_prompt=c.instance_prompt,
                                  class_prompt=c.class_prompt, class_dir=c.class_dir,
                                  identifier=c.word) if cfg.concepts_list else cfg
        identifier, class_noun, phrase = subject_words(one)
        evs[identifier] = evaluate.for_run(parts, one.instance_dir, identifier, class_noun, seeds=cfg.eval_seeds,
                                           steps=cfg.sample_steps, guidance=cfg.guidance_scale,
                                           scheduler=cfg.sample_scheduler, size=cfg.resolution, phrase=phrase,
                                           verbose=verbose)
    return next(iter(evs.values())) if len(evs) == 1 else concepts.Combined(evs)


def score_result(result, verbose: bool = False) -> dict[str, float]:
    """The scores of a run's final model (a TrainResult), as a row of metrics.json; with several subjects their mean
    and each one's own ("zwx/subject_fidelity"; nbkit.scores.concepts.per_concept splits them)."""
    cfg = result.config
    with torch.no_grad():
        return run_evaluator(cfg, result.parts, verbose).score(result.pipeline(cfg.sample_scheduler))


def subject_words(cfg) -> tuple[str, str, str]:
    """(identifier, class noun, phrase naming the subject in prompts) of a run's settings.

    The class noun is the word after the identifier in the instance prompt ("a photo of zwx dog" -> "dog"),
    else the class prompt's last word, else (TI) the initializer token.
    """
    word = cfg.placeholder_token if cfg.method == "textual_inversion" else cfg.identifier
    words = cfg.instance_prompt.split()
    i = words.index(word) if word in words else -1
    after = words[i + 1] if 0 <= i < len(words) - 1 else ""
    if after and after not in ("on", "in", "with", "at", "wearing", "and"):
        return word, after.strip(".,"), ""
    noun = (cfg.class_prompt.split() or [""])[-1].strip(".,") or (
        cfg.initializer_token if cfg.method == "textual_inversion" else "")
    if not noun:
        raise ValueError(f"Cannot tell the class of the subject from instance_prompt {cfg.instance_prompt!r}: name it "
                         f"after the identifier ('a photo of {word} dog') or set class_prompt ('a photo of a dog').")
    return word, noun, word
