"""The settings of one fine-tuning run, checked up front.

Every mistake is found before any model is loaded, and all of them are reported at once, each with what to
do about it: a run that would fail after twenty minutes of class-image generation fails in a second instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("dreambooth", "lora", "textual_inversion")
PRECISIONS = ("auto", "no", "fp16", "bf16")
PREDICTIONS = ("auto", "epsilon", "v_prediction")
TRACKERS = ("none", "auto", "all", "tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab",
            "trackio")  # accelerate's LoggerType names, and "none"


class ConfigError(ValueError):
    """One or more settings are impossible; the message lists every one and what to do."""


# A concept's keys: nbkit's names, and ShivamShrirao's concepts_list names (instance_data_dir, class_data_dir)
CONCEPT_KEYS = {"instance_dir": "instance_dir", "instance_data_dir": "instance_dir",
                "instance_prompt": "instance_prompt", "class_prompt": "class_prompt", "class_dir": "class_dir",
                "class_data_dir": "class_dir", "identifier": "identifier"}


@dataclass(frozen=True)
class Concept:
    """One subject of a run: its pictures and prompt, and (prior preservation) its class prompt and class images."""

    instance_dir: str
    instance_prompt: str
    class_prompt: str = ""
    class_dir: str = ""
    identifier: str = ""  # the word naming the subject ("": see `word`)

    @property
    def word(self) -> str:
        """The identifier: as given, else the one word of the instance prompt its class prompt lacks ("a photo of zwx
        star" / "a photo of a star": "zwx"), else the word before the prompt's last ("a photo of zwx star": "zwx")."""
        if self.identifier:
            return self.identifier
        words = self.instance_prompt.split()
        extra = [w for w in words if w not in self.class_prompt.split()]
        if self.class_prompt.strip() and len(extra) == 1:
            return extra[0]
        return words[-2] if len(words) > 1 else "".join(words)


def read_concepts(value) -> tuple[list[Concept], list[str]]:
    """concepts_list as concepts, and every problem found: a list of dicts (nbkit's or ShivamShrirao's key names),
    JSON text of one, or the path of a JSON file holding one ("" or []: none)."""
    numbered, problems = _read_concepts(value)
    return [c for _, c in numbered], problems


def _read_concepts(value) -> tuple[list[tuple[int, Concept]], list[str]]:
    """read_concepts, each concept with its place in the list (1, 2, ...: the problems name them so)."""
    if not value:
        return [], []
    if isinstance(value, (str, os.PathLike)):
        text, where = str(value), "concepts_list"
        if not text.lstrip().startswith(("[", "{")):
            if not Path(text).is_file():
                return [], [f"concepts_list {text!r}: no such file. Give a JSON file holding a list of concepts "
                            '([{"instance_prompt": ..., "instance_data_dir": ..., "class_prompt": ..., '
                            '"class_data_dir": ...}, ...]), or the list itself.']
            where = f"concepts_list file {text!r}"
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                return [], [f"{where} cannot be read ({err}): check its permissions, or give the list itself."]
        try:
            value = json.loads(text)
        except ValueError as err:
            return [], [f"{where} is not valid JSON ({err}): it must hold a list of concepts."]
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, dict) for c in value):
        return [], [f"concepts_list: expected a list of concepts (one dict each, with instance_dir and "
                    f"instance_prompt), got {type(value).__name__}."]
    out, e = [], []
    for i, c in enumerate(value, 1):
        unknown = sorted(set(c) - set(CONCEPT_KEYS))
        if unknown:
            e.append(f"concept {i}: unknown keys {unknown}; a concept has {', '.join(CONCEPT_KEYS)}.")
        kw = {CONCEPT_KEYS[k]: str(v) for k, v in c.items() if k in CONCEPT_KEYS and v is not None}
        missing = [k for k in ("instance_dir", "instance_prompt") if not kw.get(k, "").strip()]
        if missing:
            e.append(f"concept {i}: {' and '.join(missing)} missing or empty: each concept needs the folder of its "
                     "pictures (instance_dir or instance_data_dir) and the prompt naming it (instance_prompt).")
            continue
        out.append((i, Concept(**kw)))
    return out, e


@dataclass
class TrainConfig:
    """What to train, on what, for how long. Defaults are the course's object recipe on SD 1.5."""

    # --- what and on what
    model: str = "offline"  # hub id, local diffusers folder, "offline" (the kit's bundled model) or "tiny-sdxl"
    vae: str = ""  # another VAE (hub id or folder), e.g. "madebyollin/sdxl-vae-fp16-fix" (SDXL in fp16); "": own
    method: str = "dreambooth"  # "dreambooth" | "lora" | "textual_inversion"
    instance_dir: str = ""  # folder of 3-10 pictures of the subject
    instance_prompt: str = "a photo of zwx star"  # names the subject with its identifier
    identifier: str = "zwx"  # the rare word bound to the subject (avoid "sks": it is a rifle)
    output_dir: str = "outputs/run"  # where the model, samples and logs go
    # several subjects in one run, each step drawn from the next: a list of {instance_dir, instance_prompt,
    # class_prompt, class_dir} (or ShivamShrirao's instance_data_dir, class_data_dir), or a JSON file of it; it
    # replaces those four fields
    concepts_list: list | str = field(default_factory=list)
    # --- prior preservation
    with_prior_preservation: bool = False  # also train on class images made by the model itself
    class_prompt: str = ""  # e.g. "a photo of a dog": the subject's class, without the identifier
    class_dir: str = ""  # cached class images (generated there when missing)
    num_class_images: int = 100  # class images to have in class_dir
    class_batch_size: int = 4  # class images generated per batch (lower it if generation runs out of memory)
    prior_loss_weight: float = 1.0  # weight of the class images' loss term
    # --- what trains
    train_text_encoder: bool = False  # DreamBooth: fine-tune the text encoder too
    text_encoder_steps: int | None = None  # stop training the text encoder after this many steps (None: never)
    lora_rank: int = 4  # LoRA: rank of the adapters
    lora_alpha: float | None = None  # LoRA: scaling numerator (None: equal to the rank)
    lora_text_encoder: bool = False  # LoRA: adapters on the text encoder too
    placeholder_token: str = "<zwx>"  # TI: the new token
    initializer_token: str = "star"  # TI: a word whose embedding starts the new token
    num_vectors: int = 1  # TI: vectors for the new token
    # --- optimisation
    resolution: int = 512  # training image side, a multiple of 8
    center_crop: bool = True  # centre crop (else random crop)
    random_flip: bool = False  # random horizontal flips
    bucketing: bool = False  # aspect-ratio buckets: each picture trains at the (height, width) nearest its shape
    buckets: str = ""  # with bucketing: "h,w;h,w;..." in pixels; "" = a 1:2-to-2:1 ladder of ~resolution^2 pixels
    train_batch_size: int = 1  # images per step per GPU
    gradient_accumulation_steps: int = 1  # steps summed per optimizer update
    max_train_steps: int = 400  # optimizer updates
    learning_rate: float = 2e-6  # peak learning rate
    lr_scheduler: str = "constant"  # any of diffusers.optimization's names
    lr_warmup_steps: int = 0  # warm-up updates
    adam_beta1: float = 0.9  # AdamW's first-moment decay
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    adam_weight_decay: float = 1e-2  # AdamW's decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW's denominator epsilon
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    prediction_type: str = "auto"  # "auto" (the model's scheduler says), "epsilon" or "v_prediction"
    # offset noise (diffusers' --noise_offset); "auto": as the model was pretrained (toy-sd 0.1, SD 1.5 0)
    noise_offset: float | str = "auto"
    # min-SNR loss weighting (diffusers' --snr_gamma, 5.0 usual; 0 off); "auto": as pretrained
    snr_gamma: float | str = "auto"
    use_ema: bool = False  # save, sample, score an EMA of the trained weights (+1 fp32 copy of them on the GPU)
    ema_decay: float = 0.9999  # EMA: the largest decay (diffusers' default); update n uses min(it, n / (n + 9))
    # --- memory and speed
    mixed_precision: str = "auto"  # "auto" (fp16 on T4/P100, bf16 where supported, none on CPU), "no", "fp16", "bf16"
    use_8bit_adam: bool = False  # bitsandbytes 8-bit AdamW (CUDA only; falls back to AdamW with a message)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~20% slower
    cache_latents: bool = True  # encode the images once; the VAE then leaves the GPU
    optimizer_in_backward: bool = False  # step each parameter as its gradient is ready (no clipping/accumulation)
    deepspeed_config: str = ""  # DeepSpeed JSON (ZeRO-2 CPU offload: nbkit.training.presets "8gb-deepspeed"); "" = none
    # --- validation and output
    validation_prompts: list[str] = field(default_factory=list)  # sampled every validation_steps (fixed seeds)
    validation_steps: int = 100  # 0: no validation during training
    num_validation_images: int = 2  # images per validation prompt
    sample_scheduler: str = "ddim"  # scheduler for validation samples
    sample_steps: int = 50  # inference steps for validation samples
    guidance_scale: float = 7.5  # classifier-free guidance for validation samples
    eval_steps: int = 0  # score the model every this many steps into metrics.json (nbkit.evaluate; 0: off)
    eval_seeds: int = 4  # pictures per evaluation prompt (fixed seeds 0, 1, ...)
    keep_best: bool = True  # with eval_steps: keep the best-scoring model in output_dir/best (DreamBooth SD 1.5: ~4 GB)
    # trackers for losses, scores and samples: "auto" (TensorBoard when installed), "none", or accelerate's names
    # comma-separated: "tensorboard", "wandb", "all", ...
    report_to: str = "auto"
    logging_dir: str = ""  # the trackers' folder; "" = output_dir/logs
    save_dtype: str = "fp32"  # "fp32" or "fp16": precision of the saved weights
    seed: int = 0  # one seed for data order, noise and samples
    # --- checkpoints and resume (nothing lost when a runtime disconnects)
    checkpointing_steps: int = 200  # write a resumable checkpoint every this many steps (0: never)
    checkpoints_total_limit: int | None = 1  # keep at most this many checkpoints, newest first (None: keep all)
    checkpoints_dir: str = ""  # where checkpoints go; "" = output_dir/checkpoints (on Colab: a Drive folder survives)
    # "auto": from the latest complete checkpoint; a checkpoint folder; None/"never": start over
    resume: str | None = "auto"

    @staticmethod
    def field_help() -> dict[str, str]:
        """Each field's comment (on its line, or the comment lines just above it): the CLI's --help text."""
        import ast
        import io
        import tokenize

        try:
            src = Path(__file__).read_text()
        except OSError:  # no source (a zipped install): the CLI then shows the field names only
            return {}
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT]
        comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens}
        alone = {t.start[0] for t in tokens if t.line.lstrip().startswith("#")}  # a line of its own
        cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
        helps = {}
        for node in (n for n in cls.body if isinstance(n, ast.AnnAssign)):
            above, line = [], node.lineno - 1
            while line in alone and not comments[line].startswith("---"):  # "# --- section" headers are not help
                above.insert(0, comments[line])
                line -= 1
            helps[node.target.id] = comments.get(node.lineno) or " ".join(above)
        return helps

    def replace(self, **changes) -> TrainConfig:
        """A copy with some settings changed (validated)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, check_paths: bool = True) -> TrainConfig:
        """Raise ConfigError listing every impossible setting; return self when all is well."""
        e: list[str] = []
        if self.method not in METHODS:
            e.append(f"method={self.method!r}: choose one of {', '.join(METHODS)}.")
        if not self.learning_rate > 0:
            e.append(f"learning_rate={self.learning_rate}: must be > 0 (the course uses 1e-6 to 5e-6 for DreamBooth).")
        if self.resolution <= 0 or self.resolution % 8:
            e.append(f"resolution={self.resolution}: must be a positive multiple of 8 (512 for SD 1.x, 768 for "
                     "SD 2.x).")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_vectors", "lora_rank",
                     "class_batch_size"):
            if getattr(self, name) < 1:
                e.append(f"{name}={getattr(self, name)}: must be at least 1.")
        for name in ("lr_warmup_steps", "validation_steps", "eval_steps", "num_validation_images", "max_grad_norm",
                     "prior_loss_weight"):
            if getattr(self, name) < 0:
                e.append(f"{name}={getattr(self, name)}: must not be negative.")
        e += self._bucket_problems()
        if self.eval_steps and self.eval_seeds < 1:
            e.append(f"eval_seeds={self.eval_seeds}: must be at least 1 when eval_steps is on.")
        if self.mixed_precision not in PRECISIONS:
            e.append(f"mixed_precision={self.mixed_precision!r}: choose one of {', '.join(PRECISIONS)}.")
        if self.noise_offset != "auto" and not (isinstance(self.noise_offset, (int, float))
                                                and 0 <= self.noise_offset <= 1):
            e.append(f"noise_offset={self.noise_offset!r}: \"auto\" or a number from 0 to 1 (0.1 is usual, 0 turns it "
                     "off).")
        if self.snr_gamma != "auto" and not (isinstance(self.snr_gamma, (int, float)) and self.snr_gamma >= 0):
            e.append(f"snr_gamma={self.snr_gamma!r}: \"auto\" or a number >= 0 (5.0 is usual, 0 turns min-SNR "
                     "weighting off).")
        if not 0 < self.ema_decay < 1:
            e.append(f"ema_decay={self.ema_decay}: must be between 0 and 1 (0.9999 is diffusers' default; 0.999 "
                     "averages over about the last 1,000 updates).")
        if self.prediction_type not in PREDICTIONS:
            e.append(f"prediction_type={self.prediction_type!r}: choose one of {', '.join(PREDICTIONS)}.")
        unknown = [t for t in self.report_to.split(",") if t.strip() not in TRACKERS]
        if unknown:
            e.append(f"report_to={self.report_to!r}: {', '.join(map(repr, unknown))} is not a tracker; use 'none' or "
                     f"comma-separated names of {', '.join(TRACKERS[1:])}.")
        if self.save_dtype not in ("fp32", "fp16"):
            e.append(f"save_dtype={self.save_dtype!r}: choose 'fp32' or 'fp16'.")
        if self.checkpointing_steps < 0:
            e.append(f"checkpointing_steps={self.checkpointing_steps}: must be >= 0 (0 turns checkpoints off).")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            e.append(f"checkpoints_total_limit={self.checkpoints_total_limit}: must be None (keep all) or at least 1.")
        if (check_paths and self.resume not in ("auto", "never", None)
                and not (Path(self.resume) / "checkpoint.json").is_file()):
            e.append(f"resume={self.resume!r}: not a complete checkpoint folder (it has no checkpoint.json). Use "
                     "'auto' (the latest complete checkpoint), None or 'never' (start over), or a "
                     "checkpoints/step_NNNNNN folder.")
        if self.text_encoder_steps is not None and self.text_encoder_steps < 0:
            e.append(f"text_encoder_steps={self.text_encoder_steps}: must be None or >= 0.")
        # prompts
        word = self.placeholder_token if self.method == "textual_inversion" else self.identifier
        if self.concepts_list:  # each subject's own prompts and folders instead of the four fields
            e += self._concept_problems(check_paths)
        elif not word.strip():
            e.append("identifier is empty: pick a rare word (e.g. 'zwx') to name your subject.")
        elif word not in self.instance_prompt.split():
            e.append(
                f"instance_prompt {self.instance_prompt!r} does not contain {word!r} as a word: the prompt must name "
                f"the subject, e.g. 'a photo of {word} dog'."
            )
        if self.method == "textual_inversion":
            if len(self.initializer_token.split()) != 1:
                e.append(f"initializer_token={self.initializer_token!r}: must be one word (e.g. 'dog').")
            if self.train_text_encoder or self.with_prior_preservation:
                e.append("textual_inversion trains only the new embedding: set train_text_encoder=False and "
                         "with_prior_preservation=False (the TI -> DreamBooth route is two runs).")
        if self.with_prior_preservation:
            if not self.concepts_list:
                e += _class_problems(Concept(self.instance_dir, self.instance_prompt, self.class_prompt,
                                             self.class_dir, self.identifier))
            if self.num_class_images < 1:
                e.append(f"num_class_images={self.num_class_images}: must be at least 1 (the guide uses ~200).")
        if self.deepspeed_config:
            e += self._deepspeed_problems()
            if check_paths and not Path(self.deepspeed_config).is_file():
                e.append(f"deepspeed_config {self.deepspeed_config!r} does not exist: use nbkit.training.presets."
                         "deepspeed_config_path() (configs/deepspeed/zero2_offload.json) or leave it empty.")
        if check_paths and not self.concepts_list:
            e += _folder_problems(self.instance_dir)
        if e:
            raise ConfigError("These settings need fixing:\n  - " + "\n  - ".join(e))
        return self

    def _bucket_problems(self) -> list[str]:
        """cfg.buckets in diffusers' "h,w;h,w" format, each side a multiple of 8, none over resolution^2 pixels (the
        memory planner's bound); the model's own multiple (SD 1.5: 64) is checked when it is loaded."""
        if self.bucketing and self.concepts_list:
            return ["bucketing with concepts_list: not both in one run yet (a batch is one bucket or one concept). "
                    "Train the concepts with bucketing=False, or one subject per run with bucketing."]
        if not self.buckets.strip():
            return []
        if not self.bucketing:
            return [f"buckets={self.buckets!r} but bucketing=False: set bucketing=True to use them, or buckets=''."]
        pairs = [re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", p) for p in self.buckets.strip().split(";")]
        if not all(pairs):
            return [f"buckets={self.buckets!r}: write height,width pairs separated by ';', e.g. '512,512;640,384;"
                    "384,640'."]
        sizes = [(int(m[1]), int(m[2])) for m in pairs]
        e = [f"buckets: {h},{w} is not a positive multiple of 8 on each side (SD 1.5 needs multiples of 64)."
             for h, w in sizes if not (h > 0 and w > 0 and h % 8 == 0 and w % 8 == 0)]
        e += [f"buckets: {h},{w} has {h * w} pixels, more than resolution^2 = {self.resolution ** 2} (the memory "
              "plan's bound): make it smaller, or raise resolution." for h, w in sizes if h * w > self.resolution ** 2]
        return e

    def concepts(self) -> list[Concept]:
        """The run's subjects: concepts_list's, or the one of instance_dir, instance_prompt, class_prompt, class_dir."""
        if not self.concepts_list:
            word = self.placeholder_token if self.method == "textual_inversion" else self.identifier
            return [Concept(self.instance_dir, self.instance_prompt, self.class_prompt, self.class_dir, word)]
        concepts, problems = read_concepts(self.concepts_list)
        if problems:
            raise ConfigError("These settings need fixing:\n  - " + "\n  - ".join(problems))
        return concepts

    def _concept_problems(self, check_paths: bool) -> list[str]:
        """What is wrong with concepts_list: each concept's prompts and folders, and between them."""
        numbered, e = _read_concepts(self.concepts_list)
        concepts = [c for _, c in numbered]
        if self.method == "textual_inversion":
            e.append("concepts_list with method='textual_inversion': TI learns one new token. Train one run per "
                     "subject, or use method='dreambooth' or 'lora' for several subjects at once.")
        also = [f for f in ("instance_dir", "class_prompt", "class_dir") if getattr(self, f)]
        if also:
            e.append(f"concepts_list replaces {', '.join(also)}: leave {'it' if len(also) == 1 else 'them'} empty and "
                     "give every subject (its folders and prompts) in concepts_list.")
        for i, c in numbered:
            who = f"concept {i} ({c.instance_prompt!r})"
            if c.word not in c.instance_prompt.split():
                e.append(f"{who}: its identifier {c.word!r} is not a word of its instance_prompt; name the subject in "
                         f"the prompt, e.g. 'a photo of {c.word} dog'.")
            if self.with_prior_preservation:
                e += _class_problems(c, who)
            if check_paths:
                e += _folder_problems(c.instance_dir, who)
        words = [c.word for c in concepts]
        same = sorted({w for w in words if words.count(w) > 1})
        if same:
            e.append(f"several concepts are named by the same identifier ({', '.join(map(repr, same))}): each subject "
                     "needs its own rare word in its instance_prompt (or an \"identifier\" key naming it).")
        prompts: dict[str, set[str]] = {}
        for c in concepts if self.with_prior_preservation else ():
            prompts.setdefault(str(Path(c.class_dir)), set()).add(c.class_prompt.strip())
        for folder, ps in sorted(prompts.items()):
            if len(ps) > 1:
                named = ", ".join(sorted(map(repr, ps)))
                e.append(f"class_dir {folder!r} is given for {len(ps)} class prompts ({named}): give each class "
                         "prompt its own class_dir (concepts of one class may share one).")
        return e

    def _deepspeed_problems(self) -> list[str]:
        """What DeepSpeed cannot train here: accelerate prepares one model for it, and ZeRO steps its own fp32 copy."""
        e: list[str] = []
        if self.method == "dreambooth" and self.train_text_encoder:
            e.append("deepspeed_config with train_text_encoder=True: DeepSpeed here trains the UNet only (accelerate "
                     "prepares one model for it). Set train_text_encoder=False, or use PRESET='8gb' to train the text "
                     "encoder on 8 GB.")
        if self.method == "lora" and self.lora_text_encoder:
            e.append("deepspeed_config with method='lora' and lora_text_encoder=True: accelerate prepares one model "
                     "for DeepSpeed, the text encoder's adapters would be a second. Set lora_text_encoder=False (UNet "
                     "adapters only), or leave deepspeed_config empty: LoRA fits 8 GB without DeepSpeed "
                     "(PRESET='8gb').")
        if self.method == "textual_inversion":
            e.append("deepspeed_config with method='textual_inversion': ZeRO steps its own fp32 copy of the embeddings "
                     "and writes it back, undoing TI's restore of every row but the new token's. TI's memory is tiny, "
                     "it fits 8 GB without DeepSpeed: leave deepspeed_config empty (PRESET='8gb').")
        if self.use_ema:
            e.append("deepspeed_config with use_ema=True: DeepSpeed keeps the UNet in half precision (its fp32 master "
                     "weights live in the offloaded optimizer), so an EMA of it would lose the small updates, and "
                     "it would add a fp32 copy of the UNet to the GPU that DeepSpeed is there to save. Set "
                     "use_ema=False, or use PRESET='8gb' (no DeepSpeed).")
        if self.checkpointing_steps:
            e.append(f"deepspeed_config with checkpointing_steps={self.checkpointing_steps}: DeepSpeed's optimizer "
                     "state can only be saved as a pickle, which the kit never writes, so such a run cannot be "
                     "resumed. Set checkpointing_steps=0 (the 8gb-deepspeed preset does), or use PRESET='8gb' "
                     "(resumable).")
        if self.gradient_accumulation_steps != 1:
            e.append(f"deepspeed_config with gradient_accumulation_steps={self.gradient_accumulation_steps}: use 1 "
                     "(DeepSpeed would scale the loss a second time); raise train_batch_size instead.")
        return e


def _class_problems(c: Concept, who: str = "") -> list[str]:
    """A subject's class prompt and class folder, for prior preservation (`who`: which concept, "" for the only one)."""
    e, say = [], (lambda text: f"{who}: {text}" if who else text)
    if not c.class_prompt.strip():
        e.append(say("with_prior_preservation=True needs class_prompt, e.g. 'a photo of a dog'."))
    elif c.class_prompt.strip() == c.instance_prompt.strip():
        e.append(say("class_prompt equals instance_prompt: the class prompt must describe the class *without* the "
                     "identifier, e.g. 'a photo of a dog'."))
    elif (word := c.identifier or (c.word if who else "")) and word in c.class_prompt.split():
        e.append(say(f"class_prompt {c.class_prompt!r} contains the identifier {word!r}: drop it, class images show "
                     "the class, not your subject."))
    if not c.class_dir:
        e.append(say("with_prior_preservation=True needs class_dir, a folder where class images are cached."))
    return e


def _folder_problems(folder: str, who: str = "") -> list[str]:
    """A subject's picture folder: given, there, a folder, readable."""
    p, say = Path(folder) if folder else None, (lambda text: f"{who}: {text}" if who else text)
    if p is None:
        return [say("instance_dir is empty: point it at a folder with 3-10 pictures of your subject.")]
    if not p.exists():
        return [say(f"instance_dir {str(p)!r} does not exist: check the path (on Colab, upload or mount Drive "
                    "first).")]
    if not p.is_dir():
        return [say(f"instance_dir {str(p)!r} is a file, not a folder: give the folder that holds the pictures.")]
    if not os.access(p, os.R_OK | os.X_OK):
        return [say(f"instance_dir {str(p)!r} cannot be read (no permission): fix its permissions or copy the "
                    "pictures to a folder you can read.")]
    return []
