"""What a notebook costs, said up front: `nb.costs(setup, globals())` near the top of every notebook.

With the notebook's own parameters (read by their one meaning, nbkit/notebook/parameters.py) it shows:

* SD 1.5 on a free Colab T4, **planned**: the time of each piece of work (`nbkit.memory.speed`: FLOPs at an assumed
  T4 rate; no T4 has been measured yet) and the peak GPU memory (`nbkit.memory.planner` through `tuning.preview`,
  the settings `PRESET = "auto"` picks on a T4); scoring while training priced as evaluations x images x steps;
* the disk it fills on SD 1.5: model folders (~4.3 GB in fp32, ~2.1 GB in fp16), `best/` (a full fp32 model for
  DreamBooth), resumable checkpoints, exports, class images; and the downloads (SD 1.5, CLIP and DINO for scores);
* the offline model on a 2-core CPU, **measured**: the notebook run end to end with its default settings
  (docs/offline_times.json, made by `python -m benchmarks.offline_times`: seconds, what it wrote, date,
  how busy the machine was);
* with USE_DRIVE on Colab, the Google Drive space it needs against what is free, before anything is written there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from itertools import product

from nbkit.memory import speed
from nbkit.units import GiB

GB = 10**9
MODEL_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL base 1.0"}
SAMPLING_PEAK = int(3.5 * GiB)  # SD 1.5 sampling in fp16 at 512 px, CUDA context included (nbkit.notebook.course)
SCORER_BYTES = {"CLIP ViT-B/32 (openai/clip-vit-base-patch32)": 605 * 10**6,  # the hub's fp32 weights
                "DINO ViT-S/16 (facebook/dino-vits16)": 87 * 10**6}
EVAL_PROMPTS, EVAL_SEEDS = 6, 4  # per evaluation: subject, 4 new contexts, class (scores.evaluate), eval_seeds each

@dataclass(frozen=True)
class Measured:
    """One notebook run end to end with papermill on the offline model, its default parameters, a 2-core CPU."""

    seconds: float  # wall-clock time of the whole run
    written: int  # bytes it wrote (its output folder)
    date: str
    machine: str  # the machine and how busy it was (other jobs share these 2 cores)


OFFLINE_TIMES = "docs/offline_times.json"  # written by `python -m benchmarks.offline_times` (each default run timed)


def measured(notebook: str) -> Measured | None:
    """The measured default offline run of `notebook` (docs/offline_times.json), or None when not measured yet."""
    import json

    from nbkit.paths import ROOT

    path = ROOT / OFFLINE_TIMES
    try:
        row = json.loads(path.read_text())[notebook]
    except (OSError, ValueError, KeyError):
        return None
    cores, load = row.get("cores") or 2, row.get("load", 0.0)
    busy = (f", shared with other jobs (load {load:g}: an idle one is faster)" if load > cores
            else f", load {load:g}")
    return Measured(row["seconds"], row["written"], row["date"],
                    f"a {cores}-core {row.get('machine', 'CPU')} machine{busy}, commit {row.get('commit', '?')}")


@dataclass
class Costs:
    """The costs of one notebook with its settings (see the module doc); shown as a table."""

    notebook: str
    model: str = "sd15"  # what the T4 figures are for: "sd15" (SD 1.5 at 512 px) or "sdxl" (SDXL base at 1024 px)
    time: list[tuple[str, float]] = field(default_factory=list)  # (what, planned seconds on a T4)
    peak: int = 0  # planned peak GPU memory on a T4 (bytes the GPU must have)
    peak_note: str = ""
    disk: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes) written with SD 1.5
    downloads: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes), once (cached)
    offline: Measured | None = None  # measured(notebook)
    drive: str = ""  # the Google Drive check (USE_DRIVE)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.time)

    @property
    def disk_bytes(self) -> int:
        return sum(b for _, b in self.disk)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(where, time, GPU memory, disk) for SD 1.5 on a T4 (planned) and the offline model (measured)."""
        t4 = (f"{MODEL_NAMES[self.model]} on a T4 (planned)", f"~{_minutes(self.seconds)}",
              f"{self.peak / GiB:.1f} GiB peak (planned)",
              f"{self.disk_bytes / GB:.1f} GB")
        if self.offline:
            m = self.offline
            cpu = (f"offline model on a CPU (measured {m.date}, default settings, on {m.machine})",
                   f"{_minutes(m.seconds)} (measured)", "none (CPU)", f"{m.written / 10**6:.0f} MB")
        else:
            cpu = ("offline model on a CPU", "not measured yet (python -m benchmarks.offline_times)", "none (CPU)",
                   "")
        return [t4, cpu]

    def __str__(self) -> str:
        lines = [f"What {self.notebook} costs with the settings above:"]
        lines += [f"  {w}: {t} · GPU {m} · disk {d}" for w, t, m, d in self.rows()]
        lines.append("  T4 time, planned (FLOPs at an assumed T4 rate, nbkit.memory.speed; no T4 measured yet):")
        lines += [f"    {_minutes(s):>8}  {what}" for what, s in self.time]
        if self.peak_note:
            lines.append(f"  GPU memory: {self.peak_note}")
        lines.append(f"  Disk on {MODEL_NAMES[self.model]}:")
        lines += [f"    {b / GB:6.2f} GB  {what}" for what, b in self.disk]
        if self.downloads:
            lines.append("  Downloads, once (cached): " + "; ".join(f"{w} {b / GB:.2f} GB" for w, b in self.downloads))
        if self.drive:
            lines.append(f"  {self.drive}")
        return "\n".join(lines)

    __repr__ = __str__  # the text a console or a plain-text output shows

    def _repr_markdown_(self) -> str:
        head = ["| | time | GPU memory | disk |", "|---|---|---|---|"]
        table = head + [f"| {w} | {t} | {m} | {d} |" for w, t, m, d in self.rows()]
        return "\n".join(table) + "\n\n```\n" + str(self) + "\n```"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"



# ------------------------------------------------------------------------------------------- the pieces of work
def _arch(model: str = "sd15"):
    from nbkit.memory import planner

    return planner.arch_of(model)


def _model_bytes(fp16: bool, model: str = "sd15") -> int:
    a = _arch(model)
    return (a.unet + a.text_encoder + a.text_encoder_2 + a.vae) * (2 if fp16 else 4)


def _trained(cfg) -> int:
    """Parameters the optimizer updates in a run of `cfg` (its model: "sd15" or "sdxl")."""
    a = _arch(cfg.model)
    if cfg.method == "lora":
        te = a.lora_per_rank_te + a.lora_per_rank_te2 if cfg.lora_text_encoder else 0
        return cfg.lora_rank * (a.lora_per_rank_unet + te)
    if cfg.method == "textual_inversion":
        return a.token_embedding
    return a.unet + (a.text_encoder if cfg.train_text_encoder else 0)


def _evaluations(steps: int, every: int) -> int:
    """Evaluations of a run scored every `every` steps: before the first step, every `every`, and after the last."""
    return 0 if not every else 1 + steps // every + (1 if steps % every else 0)


def train(c: Costs, label: str, steps: int, *, eval_every: int = 0, validation: tuple[int, int] = (0, 0),
          sample_steps: int = 50, checkpoint_every: int = 200, keep_best: bool = True, save_fp16: bool = False,
          keep_model: bool = True, plan_as: dict | None = None, eval_seeds: int = EVAL_SEEDS, **settings) -> None:
    """One training run of c.model at its size on a T4, tuned as PRESET="auto" tunes it (`settings`: TrainConfig
    fields; `plan_as`: other fields the memory settings are chosen for, as notebooks 02 and 04 do); validation:
    (every this many steps, images each time)."""
    from nbkit.config import TrainConfig
    from nbkit.memory.tuning import preview

    m = c.model
    base = TrainConfig(model=m, max_train_steps=steps, **settings)
    tuned = preview(dataclasses.replace(base, **(plan_as or {})), "T4", model=m)
    cfg = tuned.config
    trained, eight = _trained(base), cfg.use_8bit_adam
    pictures = cfg.train_batch_size * (2 if base.with_prior_preservation else 1)
    per_step = speed.train_step_seconds(base.method, pictures, trained, checkpointing=cfg.gradient_checkpointing,
                                        eight_bit=eight, model=m)
    c.time.append((f"{label}: {steps} training steps ({per_step:.2f} s each)",
                   steps * per_step + speed.encode_seconds(5, model=m)))
    every, images = validation
    if every and images:
        n = steps // every
        c.time.append((f"{label}: {n} validations x {images} images x {sample_steps} steps",
                       n * speed.sample_seconds(images, sample_steps, model=m)))
    scorers = 0
    if eval_every:
        n, per = _evaluations(steps, eval_every), EVAL_PROMPTS * eval_seeds
        c.time.append((f"{label}: scoring, {n} evaluations x {per} images x {sample_steps} steps",
                       n * speed.sample_seconds(per, sample_steps, model=m)))
        scorers = sum(SCORER_BYTES.values())
        for what, b in SCORER_BYTES.items():
            if (what, b) not in c.downloads:
                c.downloads.append((what, b))
    if tuned.plan.needed + scorers >= c.peak:
        c.peak = tuned.plan.needed + scorers
        c.peak_note = (f"{label}, preset {tuned.preset!r} on a T4 ({'8-bit AdamW' if eight else 'AdamW'}, "
                       f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'})"
                       + (", + CLIP and DINO while scoring" if scorers else ""))
    full = base.method == "dreambooth"
    if keep_model:
        c.disk.append((f"{label}: model/", _model_bytes(save_fp16, m) if full else trained * 2))
    if eval_every and keep_best:
        c.disk.append((f"{label}: best/ (the best-scoring model)", _model_bytes(False, m) if full else trained * 4))
    if checkpoint_every and steps >= checkpoint_every:
        c.disk.append((f"{label}: its latest resumable checkpoint", trained * (4 + (2 if eight else 8))))


def sample(c: Costs, label: str, images: int, steps: int) -> None:
    c.time.append((f"{label}: {images} images x {steps} steps", speed.sample_seconds(images, steps, model=c.model)))
    if c.model == "sd15":  # SDXL: the training plan is the peak (fp16 UNet, the fp32 VAE one picture at a time)
        c.peak = max(c.peak, SAMPLING_PEAK)


def export(c: Costs, method: str, lora_rank: int = 8, lora_text_encoder: bool = False, steps: int = 50) -> None:
    """The take-home files: DreamBooth an fp16 folder and an fp16 single file; LoRA two small files; TI KBs."""
    if method == "dreambooth":
        c.disk.append(("export/: fp16 diffusers folder + single-file .safetensors", 2 * _model_bytes(True, c.model)))
    elif method == "lora":
        from nbkit.config import TrainConfig

        adapters = _trained(TrainConfig(model=c.model, method="lora", lora_rank=lora_rank,
                                        lora_text_encoder=lora_text_encoder))
        c.disk.append(("export/: two LoRA files (fp16)", 2 * 2 * adapters))
    sample(c, "export checks (each file reloaded)", 2, steps)


# ----------------------------------------------------------------------------------------------- per notebook
def _n00(c: Costs, p: dict) -> None:
    sample(c, "the playground's first grid", 4, p["SAMPLE_STEPS"])
    if p.get("DOWNLOAD"):
        c.downloads.insert(0, ("SD 1.5 (fp32 weights of its networks)", _model_bytes(False)))


def _n01(c: Costs, p: dict, label: str = "DreamBooth", steps: int | None = None, keep: bool = True) -> None:
    ss = p["SAMPLE_STEPS"]
    train(c, label, steps or p["MAX_TRAIN_STEPS"], eval_every=p.get("EVAL_STEPS", 0),
          validation=(p.get("VALIDATION_STEPS", 0), 4), sample_steps=ss,
          checkpoint_every=p.get("CHECKPOINTING_STEPS", 200), keep_model=keep, keep_best=keep,
          train_batch_size=p.get("TRAIN_BATCH_SIZE", 1))
    sample(c, f"{label}: before/after pictures, reload check, playground", 4 + 8 + 1 + 2, ss)
    if p.get("EXPORT", True):
        export(c, "dreambooth")


def _n02(c: Costs, p: dict) -> None:
    ss, n, ev = p["SAMPLE_STEPS"], p["NUM_SEEDS"], p.get("EVAL_STEPS", 0)
    common = dict(eval_every=ev, sample_steps=ss, train_batch_size=p["TRAIN_BATCH_SIZE"],
                  plan_as=dict(with_prior_preservation=True))
    sample(c, "class images (generated once, cached)", p["NUM_CLASS_IMAGES"], ss)
    c.disk.append((f"{p['NUM_CLASS_IMAGES']} class images (PNG, at most)", p["NUM_CLASS_IMAGES"] * 512 * 512 * 3))
    train(c, "without prior", p["MAX_TRAIN_STEPS"], **common)
    train(c, "with prior", p["MAX_TRAIN_STEPS"], with_prior_preservation=True, **common)
    if p.get("PRIOR_TRAIN_TEXT_ENCODER"):
        both = dict(with_prior_preservation=True, train_text_encoder=True)
        train(c, "with prior + text encoder", p["MAX_TRAIN_STEPS"], **both, **{**common, "plan_as": both})
    sample(c, "comparisons (4 prompts, before / without / with)", 4 * n * 3 + 2, ss)
    sample(c, "scores before and after (CLIP + DINO; toy judge offline)", 3 * EVAL_PROMPTS * 8, ss)
    if p.get("EXPORT", True):
        export(c, "dreambooth")


def _n03(c: Costs, p: dict) -> None:
    if not p.get("FINETUNED_MODEL"):
        train(c, "DreamBooth", p["MAX_TRAIN_STEPS"], eval_every=p.get("EVAL_STEPS", 0),
              train_batch_size=p["TRAIN_BATCH_SIZE"])
    steps = p["SAMPLE_STEPS"] if isinstance(p["SAMPLE_STEPS"], list) else [p["SAMPLE_STEPS"]]
    for s in steps:
        sample(c, f"the grid at {s} steps: {len(p['SCHEDULERS'])} schedulers x {p['NUM_SEEDS']} seeds",
               len(p["SCHEDULERS"]) * p["NUM_SEEDS"], s)
    if p.get("REFERENCE_STEPS"):
        sample(c, "the DDIM reference pictures", p["NUM_SEEDS"], p["REFERENCE_STEPS"])
    if p.get("EXPORT", True):
        export(c, "dreambooth")


def _n04(c: Costs, p: dict) -> None:
    common = dict(eval_every=p.get("EVAL_STEPS", 0), sample_steps=p["SAMPLE_STEPS"],
                  train_batch_size=p["TRAIN_BATCH_SIZE"], plan_as=dict(train_text_encoder=True),
                  gradient_accumulation_steps=p.get("GRADIENT_ACCUMULATION_STEPS", 1))
    train(c, "text encoder frozen", p["MAX_TRAIN_STEPS"], **common)
    train(c, "text encoder trained", p["MAX_TRAIN_STEPS"], train_text_encoder=True, **common)
    sample(c, "the comparison and the playground", 2 * p["NUM_SEEDS"] * 2 + 2, p["SAMPLE_STEPS"])
    if p.get("EXPORT", True):
        export(c, "dreambooth")


def _n05(c: Costs, p: dict) -> None:
    ss = p["SAMPLE_STEPS"]
    train(c, "textual inversion", p["TI_STEPS"], method="textual_inversion", eval_every=p.get("EVAL_STEPS", 0),
          validation=(p.get("VALIDATION_STEPS", 0), 4), sample_steps=ss, num_vectors=p.get("NUM_VECTORS", 1))
    sample(c, "before/after pictures and the playground", 4 + 8 + 2, ss)
    if p.get("COMPARE_DREAMBOOTH", True):
        for label, te in (("TI -> DreamBooth", False), ("DreamBooth", False), ("DreamBooth + text encoder", True)):
            train(c, label, p["DB_STEPS"], train_text_encoder=te, save_fp16=True)
            sample(c, f"{label}: pictures", 8, ss)
    if p.get("EXPORT", True):
        export(c, "textual_inversion")


def _n06(c: Costs, p: dict) -> None:
    ss, steps = p["SAMPLE_STEPS"], p["MAX_TRAIN_STEPS"]
    lora = dict(method="lora", lora_rank=p["LORA_RANK"], lora_alpha=p["LORA_ALPHA"],
                lora_text_encoder=p.get("LORA_TEXT_ENCODER", False), train_batch_size=p["TRAIN_BATCH_SIZE"])
    train(c, "LoRA", steps, eval_every=p.get("EVAL_STEPS", 0), validation=(p.get("VALIDATION_STEPS", 0), 4),
          sample_steps=ss, **lora)
    sample(c, "LoRA: pictures, scales, fused/unfused, kohya file, playground",
           4 + 8 + 1 + 2 * len(p["SCALES"]) + 2 + 1 + 2, ss)
    if p.get("COMPARE_DREAMBOOTH", True):
        train(c, "DreamBooth (comparison)", steps, eval_every=p.get("EVAL_STEPS", 0), keep_best=False,
              validation=(p.get("VALIDATION_STEPS", 0), 4), sample_steps=ss,
              save_fp16=p.get("SAVE_DTYPE") == "fp16", train_batch_size=p["TRAIN_BATCH_SIZE"])
        sample(c, "DreamBooth: pictures", 8, ss)
    if p.get("EXPORT", True):
        export(c, "lora", p["LORA_RANK"])


def _n07(c: Costs, p: dict) -> None:
    runs = list(product(p["LEARNING_RATES"], p["MAX_TRAIN_STEPS"]))
    keep = p.get("KEEP_MODELS", False)
    each = dict(p, EXPORT=False)
    for rate, steps in runs:
        _n01(c, each, f"run LR {rate:g}, {steps} steps", steps, keep=True)
    if not keep:  # a finished run's model/ and best/ are deleted: at most one run's folders at a time
        biggest = max(sum(b for w, b in c.disk if w.startswith(f"run LR {r:g}, {s} steps")) for r, s in runs)
        c.disk = [("one run's model/, best/ and checkpoint at a time (deleted when it ends)", biggest)]
    c.disk.append((f"{len(runs)} runs' validation pictures and logs", len(runs) * 5 * 10**6))


def _n08(c: Costs, p: dict) -> None:
    ss, every = p["SAMPLE_STEPS"], p.get("VALIDATION_STEPS", 0)
    lora = dict(method="lora", lora_rank=p["LORA_RANK"], lora_alpha=p["LORA_ALPHA"],
                lora_text_encoder=p.get("LORA_TEXT_ENCODER", False), train_batch_size=p["TRAIN_BATCH_SIZE"],
                gradient_accumulation_steps=p.get("GRADIENT_ACCUMULATION_STEPS", 1))
    train(c, "SDXL LoRA", p["MAX_TRAIN_STEPS"], eval_every=p.get("EVAL_STEPS", 0), eval_seeds=p.get("EVAL_SEEDS", 4),
          validation=(every, 2 * p.get("VALIDATION_IMAGES", 1)), sample_steps=ss,
          checkpoint_every=p.get("CHECKPOINTING_STEPS", 200), **lora)
    sample(c, "before/after pictures and the playground", 4 + 8 + 2, ss)
    if p.get("EXPORT", True):
        export(c, "lora", p["LORA_RANK"], p.get("LORA_TEXT_ENCODER", False), ss)


BUILDERS = {"00_start_here": _n00, "01_dreambooth": _n01, "02_prior_preservation": _n02, "03_schedulers": _n03,
            "04_text_encoder": _n04, "05_textual_inversion": _n05, "06_lora": _n06,
            "07_finding_the_sweet_spot": _n07, "08_sdxl_lora": _n08}
MODELS = {"08_sdxl_lora": "sdxl"}  # the others: SD 1.5


def estimate(notebook: str, params: dict) -> Costs:
    """The Costs of `notebook` with these parameter values (upper-case names; the others are ignored)."""
    if notebook not in BUILDERS:
        raise ValueError(f"No cost model for {notebook!r}: add one to nbkit/notebook/costs.py ({', '.join(BUILDERS)}).")
    p = {k: v for k, v in params.items() if k.isupper()}
    c = Costs(notebook, MODELS.get(notebook, "sd15"), offline=measured(notebook))
    BUILDERS[notebook](c, p)
    if notebook != "00_start_here":
        c.downloads.insert(0, (f"{MODEL_NAMES[c.model]} (fp32 weights of its networks)", _model_bytes(False, c.model)))
    return c


def costs(setup, params: dict) -> Costs:
    """`nb.costs(setup, globals())`: this notebook's costs with the parameters above (see the module doc). With
    USE_DRIVE, the Drive space it needs is checked against what is free before anything is written there."""
    from nbkit.env import colab

    c = estimate(setup.notebook, params)
    if params.get("USE_DRIVE") and setup.rt.platform == "colab":  # the model cache goes to Drive too
        needed = c.disk_bytes + sum(b for _, b in c.downloads)
        c.drive = colab.drive_space(needed, setup.files.root if setup.files.on_drive else None)
        print(c.drive)
    return c
