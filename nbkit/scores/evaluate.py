"""How good is a fine-tuned model? The DreamBooth paper's measures, one interface for the toy and the real model.

Three numbers, each in [0, 1], higher is more of it:

- subject fidelity: do the pictures of your subject (plain and in new contexts) show *your* subject? The paper's
  DINO score: cosine similarity of DINO ViT-S/16 CLS embeddings of generated vs instance pictures, over all of
  them (CLIP-I, the same with CLIP image embeddings, is reported too);
- prompt fidelity: do pictures of the subject in new contexts ("... on the beach") show what the prompt asks?
  CLIP-T: cosine similarity of CLIP image and text embeddings (the identifier is left out of the text: CLIP
  does not know the word);
- class drift: do plain class pictures ("a photo of a dog") now look like your subject? DINO similarity of
  class-prompt pictures to the instance pictures (rising = language drift; prior preservation holds it down).
  Their diversity (mean pairwise DINO distance) is reported too: an overfit model draws the same dog each time.

The metric functions take PIL images (`clip_i`, `dino`, `clip_t`, `diversity`); the models come from transformers
(`CLIPModel`, `CLIPProcessor`; `AutoModel`/`AutoImageProcessor` for DINO) by hub id or local folder.

On the offline toy model (64 px shapes) CLIP and DINO mean nothing: the toy judge (nbkit.toy.judge) reads the world's
ground truth instead and gives the same three numbers as shares of pictures. `for_run` picks the right one:

    ev = evaluate.for_run("offline", "data/instance/zwx_star", "zwx", "star")  # prints which scorer and why
    ev.score(pipe)  # {'subject_fidelity': .., 'prompt_fidelity': .., 'class_drift': .., 'tradeoff': .., ...}

`tradeoff` is the harmonic mean of subject and prompt fidelity: high only when both are (nbkit.scores.tracking keeps the
model with the best one during training).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.env import runtime
from nbkit.models.offline import NEW_CONTEXTS, OFFLINE_RESOLUTION

CLIP_ID = "openai/clip-vit-base-patch32"  # the DreamBooth paper's CLIP-I / CLIP-T model
DINO_ID = "facebook/dino-vits16"  # the paper's DINO model (ViT-S/16)
REAL_CONTEXTS = ("on the beach", "in the snow", "in the jungle", "on a cobblestone street")  # from the paper's list


class EvaluatorUnavailable(OSError):
    """A scoring model could not be loaded; the message says why and what to do."""


class Unscorable(EvaluatorUnavailable):
    """The run's pictures are valid but no scorer can read them (ordinary photos on the offline toy model: the toy
    judge knows only its world's shapes, CLIP and DINO cannot read 64 px toy pictures). Training goes on unscored
    (nbkit.scores.tracking); `except EvaluatorUnavailable` catches it too."""


# ------------------------------------------------------------------------------------------------ the two models

def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load(kind: str, model_id: str, loader):
    """Call loader(source, **kw) with hub settings like nbkit.models.parts.load_parts; clear error when it fails."""
    local = Path(model_id).is_dir()
    offline = not local and not runtime.hub_reachable()
    kw = {"local_files_only": True} if offline else {}
    try:
        return loader(model_id, **kw)
    except (OSError, ValueError) as err:
        if local:
            why = f"the folder {model_id!r} does not hold a saved {kind} model (config.json, weights, preprocessor)"
        elif offline:
            why = (f"the model hub cannot be reached (no network, or HF_HUB_OFFLINE is set) and {model_id!r} is not "
                   "cached")
        else:
            why = f"the hub has no {model_id!r} (check the spelling)"
        raise EvaluatorUnavailable(
            f"Could not load the {kind} model for scoring: {why}.\n({str(err).splitlines()[0]})\n"
            f"Connect to the internet once (it is cached), point it at a local folder saved with save_pretrained "
            f"(for_run(..., {kind.lower()}_model='path')), or train without scores (eval_steps=0)."
        ) from err


def _features(out) -> torch.Tensor:
    """get_image_features/get_text_features return a tensor (transformers 4) or an output object (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class _Scorer:
    """A transformers model and its processor on a device (fp16 on a GPU), loaded by hub id or folder."""

    model: object
    processor: object
    device: torch.device

    @classmethod
    def _from(cls, what: str, model_id: str, load_model, load_processor, device: str | None):
        dev = _device(device)
        model = _load(what, model_id, load_model)
        processor = _load(what, model_id, load_processor)
        return cls(model.to(dev, torch.float16 if dev.type == "cuda" else torch.float32).eval(), processor, dev)

    def _pixels(self, images: list) -> torch.Tensor:
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        return px.to(self.device, self.model.dtype)


class Clip(_Scorer):
    """CLIP's image and text towers (transformers CLIPModel + CLIPProcessor), for CLIP-I and CLIP-T."""

    @classmethod
    def load(cls, model_id: str = CLIP_ID, device: str | None = None) -> Clip:
        from transformers import CLIPModel, CLIPProcessor

        return cls._from("CLIP", model_id, CLIPModel.from_pretrained, CLIPProcessor.from_pretrained, device)

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        """Unit-length image embeddings, [n, d] float32."""
        f = _features(self.model.get_image_features(pixel_values=self._pixels(images)))
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """Unit-length text embeddings, [n, d] float32."""
        tok = self.processor(text=list(prompts), padding=True, truncation=True, return_tensors="pt")
        f = _features(self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                                   attention_mask=tok.attention_mask.to(self.device)))
        return torch.nn.functional.normalize(f.float(), dim=-1).cpu()


class Dino(_Scorer):
    """A self-supervised ViT (DINO): its CLS embedding tells apart individual objects of one class."""

    @classmethod
    def load(cls, model_id: str = DINO_ID, device: str | None = None) -> Dino:
        from transformers import AutoImageProcessor, AutoModel

        def model(source, **kw):
            return AutoModel.from_pretrained(source, add_pooling_layer=False, **kw)

        return cls._from("DINO", model_id, model, AutoImageProcessor.from_pretrained, device)

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        """Unit-length CLS embeddings, [n, d] float32."""
        cls_token = self.model(pixel_values=self._pixels(images)).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls_token.float(), dim=-1).cpu()


_MODELS: dict[tuple, object] = {}


def _default(kind, model: str | None, device: str | None = None):
    """Clip.load / Dino.load, cached per (kind, id, device): the metrics load a model once per session."""
    model_id = model or os.environ.get(f"NBKIT_{kind.__name__.upper()}_MODEL") or (CLIP_ID if kind is Clip else DINO_ID)
    key = (kind.__name__, str(model_id), str(_device(device)))
    if key not in _MODELS:
        _MODELS[key] = kind.load(model_id, device)
    return _MODELS[key]


# ------------------------------------------------------------------------------------------------ the metrics

def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (rows of a) x (rows of b); both unit length."""
    return float((a @ b.T).mean())


def clip_i(images: list, references: list, clip: Clip | str | None = None) -> float:
    """CLIP-I: mean cosine similarity of CLIP image embeddings, every generated image vs every reference."""
    clip = clip if isinstance(clip, Clip) else _default(Clip, clip)
    return _mean_cosine(clip.images(images), clip.images(references))


def dino(images: list, references: list, model: Dino | str | None = None) -> float:
    """DINO: mean cosine similarity of DINO CLS embeddings, every generated image vs every reference."""
    model = model if isinstance(model, Dino) else _default(Dino, model)
    return _mean_cosine(model.images(images), model.images(references))


def clip_t(images: list, prompts: str | list[str], clip: Clip | str | None = None) -> float:
    """CLIP-T: mean cosine similarity of each image's CLIP embedding with its prompt's (one prompt for all, or one
    per image)."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"clip_t: {len(images)} images but {len(prompts)} prompts: give one prompt, or one per image.")
    clip = clip if isinstance(clip, Clip) else _default(Clip, clip)
    return float((clip.images(images) * clip.texts(prompts)).sum(-1).mean())


def class_drift(class_images: list, references: list, model: Dino | str | None = None) -> float:
    """Language drift: DINO similarity of plain class-prompt pictures ("a photo of a dog") to the instance pictures.
    Compare it with the base model's: a rise means the class has started to look like your subject."""
    return dino(class_images, references, model)


def diversity(images: list, model: Dino | Clip | str | None = None) -> float:
    """Mean pairwise cosine distance (1 - similarity) among the images' DINO (or CLIP) embeddings: 0 when the
    model draws the same picture every time."""
    if len(images) < 2:
        raise ValueError("diversity needs at least two images.")
    model = model if isinstance(model, (Dino, Clip)) else _default(Dino, model)
    e = model.images(images)
    sim = e @ e.T
    n = len(e)
    return max(0.0, float(1 - (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))))


def tradeoff(subject: float, prompt: float) -> float:
    """Harmonic mean of subject and prompt fidelity (0 when either is 0 or below): high only when both are."""
    return 0.0 if subject <= 0 or prompt <= 0 else 2 * subject * prompt / (subject + prompt)


# ------------------------------------------------------------------------------------------------ evaluators

@dataclass
class Evaluator:
    """Draws fixed-seed pictures of a model (subject prompt, the subject in new contexts, the class prompt) and
    scores them; `score()` returns subject_fidelity, prompt_fidelity, class_drift, tradeoff and raw metrics."""

    identifier: str
    class_noun: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    steps: int = 25  # sampling steps
    guidance: float = 7.5
    scheduler: str | None = None  # None: the pipeline's own
    size: int | None = None  # image side (None: the model's)
    phrase: str = ""  # the words naming the subject in prompts ("": identifier + class noun, "zwx dog")
    name: str = "evaluator"
    why: str = ""

    def subject_phrase(self) -> str:
        return self.phrase or f"{self.identifier} {self.class_noun}".strip()

    def prompts(self) -> dict[str, list[str]]:
        """The prompts drawn at each evaluation: {"subject": [..], "context": [..], "class": [..]}."""
        raise NotImplementedError

    def draw(self, pipe) -> dict:
        """Generate the pictures to score: {"subject": [...], "context": ([...], prompts), "class": [...]}."""
        from nbkit.sample.sampling import generate

        p = self.prompts()
        groups = [[q for q in p[g] for _ in self.seeds] for g in ("subject", "context", "class")]
        images = generate(pipe, p["subject"] + p["context"] + p["class"], seeds=self.seeds, steps=self.steps,
                          guidance=self.guidance, scheduler=self.scheduler, size=self.size)  # prompt-major, one call
        a, b = len(groups[0]), len(groups[0]) + len(groups[1])
        return {"subject": images[:a], "context": (images[a:b], groups[1]), "class": images[b:]}

    def score(self, pipe_or_images) -> dict[str, float]:
        """Score a pipeline (draws the pictures first) or a dict of pictures already drawn (as `draw` returns)."""
        images = pipe_or_images if isinstance(pipe_or_images, dict) else self.draw(pipe_or_images)
        s = self._score(images)
        s["tradeoff"] = tradeoff(s["subject_fidelity"], s["prompt_fidelity"])
        return s

    def _score(self, images: dict) -> dict[str, float]:
        raise NotImplementedError


@dataclass
class JudgeEvaluator(Evaluator):
    """The toy model's scores, read by the toy judge from the world's ground truth (shares of pictures)."""

    subject: str = "zwx"  # which toy subject (toyworld.SUBJECTS) the instance pictures show
    contexts: tuple[str, ...] = NEW_CONTEXTS  # backgrounds the instance pictures never show
    name: str = "toy judge"

    def prompts(self) -> dict[str, list[str]]:
        return {"subject": [f"a photo of {self.subject_phrase()}"],
                "context": [f"a photo of a {self.subject_phrase()} on a {bg} background" for bg in self.contexts],
                "class": [f"a photo of a {self.class_noun}"]}

    def _score(self, images: dict) -> dict[str, float]:
        from nbkit.toy import judge

        s = judge.scores(images, subject=self.subject)
        s["subject_fidelity_plain"] = s["subject_fidelity"]  # judge.scores' number: the plain subject prompt only
        s["subject_fidelity"] = judge.subject_fidelity(images["subject"] + list(images["context"][0]), self.subject)
        seen = judge.predict(images["class"])
        kinds = {(x["shape"], x["colour"], x["background"]) for x in seen}  # what the class pictures show
        s["class_diversity"] = (len(kinds) - 1) / max(1, len(seen) - 1)
        return s


@dataclass
class ClipDinoEvaluator(Evaluator):
    """The DreamBooth paper's scores with CLIP and DINO against the instance pictures."""

    references: list = field(default_factory=list)  # the instance pictures
    contexts: tuple[str, ...] = REAL_CONTEXTS
    clip: Clip | None = None
    dino: Dino | None = None
    name: str = "CLIP + DINO"

    def prompts(self) -> dict[str, list[str]]:
        return {"subject": [f"a photo of {self.subject_phrase()}"],
                "context": [f"a photo of {self.subject_phrase()} {c}" for c in self.contexts],
                "class": [f"a photo of a {self.class_noun}"]}

    def _score(self, images: dict) -> dict[str, float]:
        ctx_images, ctx_prompts = images["context"]
        # CLIP does not know the identifier: "a photo of zwx dog on the beach" -> "a photo of dog on the beach"
        text = [" ".join(p.replace(self.subject_phrase(), self.class_noun).split()) for p in ctx_prompts]
        subject = images["subject"] + list(ctx_images)  # the paper scores the subject over every prompt
        s = {"subject_fidelity": dino(subject, self.references, self.dino),
             "prompt_fidelity": clip_t(ctx_images, text, self.clip),
             "class_drift": class_drift(images["class"], self.references, self.dino),
             "clip_i": clip_i(subject, self.references, self.clip),
             "subject_fidelity_plain": dino(images["subject"], self.references, self.dino)}
        if len(images["class"]) > 1:
            s["class_diversity"] = diversity(images["class"], self.dino)
        return s


# ------------------------------------------------------------------------------------------------ choosing one

def _model_px(model) -> int | None:
    """Image side of a pipeline, SDParts or diffusers folder (None: cannot tell, e.g. a hub id)."""
    import json

    if isinstance(model, (str, Path)):
        from nbkit.models.parts import resolve

        folder = Path(resolve(str(model)))
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return model.unet.config.sample_size * 2 ** (len(model.vae.config.block_out_channels) - 1)


def _toy_subject(references: list) -> tuple[str | None, set[str]]:
    """Which toy subject the instance pictures show (most of them, as the judge sees them) or None, and on which
    backgrounds."""
    from nbkit.toy import judge
    from nbkit.toy import world as toyworld

    seen = judge.predict(references)
    votes = {k: sum(judge.is_subject(s, k) for s in seen) for k in toyworld.SUBJECTS}
    best = max(votes, key=votes.get)
    return (best if votes[best] * 2 > len(seen) else None), {s["background"] for s in seen}


def for_run(model, instance_dir: str | Path, identifier: str, class_noun: str, *, seeds: int | list[int] = 4,
            steps: int = 25, guidance: float = 7.5, scheduler: str | None = None, size: int | None = None,
            phrase: str = "",
            clip_model: str | None = None, dino_model: str | None = None, device: str | None = None,
            verbose: bool = True, optional: bool = False) -> Evaluator | None:
    """The evaluator for a run: the toy judge on the offline toy model (64 px pictures), CLIP + DINO otherwise.

    `model`: "offline", a hub id, a diffusers folder, SDParts or a pipeline. `phrase` names the subject in prompts
    when it is not "<identifier> <class_noun>" (Textual Inversion: "<zwx>"). `clip_model`/`dino_model` override
    the hub ids (also NBKIT_CLIP_MODEL / NBKIT_DINO_MODEL). Prints which scorer it chose and why.
    `optional=True`: when CLIP/DINO cannot be loaded (no hub, nothing cached), or the offline model is trained on
    pictures the toy judge cannot read (not toy-world pictures: Unscorable), say so and return None instead of
    raising EvaluatorUnavailable (a notebook then shows pictures without numbers).
    """
    from nbkit.data import images as data

    refs = [e.image for e in data.load_folder(instance_dir, 0, "instance")]
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    common = dict(identifier=identifier, class_noun=class_noun, seeds=seeds, steps=steps, guidance=guidance,
                  scheduler=scheduler, phrase=phrase)
    px = _model_px(model)
    if px == OFFLINE_RESOLUTION:
        subject, shown = _toy_subject(refs)
        if subject is None:
            err = Unscorable(f"the pictures in {instance_dir} show none of the toy world's subjects, so the toy judge "
                             "cannot score them (it reads the shapes, colours and stripes of its own world, not "
                             f"photos), and CLIP and DINO mean nothing on the offline model's {px} px toy pictures")
            if not optional:
                raise err
            print(f"No scores for this run: {err}.")
            return None
        contexts = tuple(b for b in NEW_CONTEXTS if b not in shown) or NEW_CONTEXTS  # backgrounds it never saw
        ev: Evaluator = JudgeEvaluator(**common, size=OFFLINE_RESOLUTION, subject=subject, contexts=contexts,
                                       why=f"the model draws {px} px toy-world pictures, which CLIP and DINO cannot "
                                           f"read: the toy judge scores them from the world's ground truth "
                                           f"(subject {subject!r})")
    else:
        try:
            clip, dino_model_ = _default(Clip, clip_model, device), _default(Dino, dino_model, device)
        except EvaluatorUnavailable as err:
            if not optional:
                raise
            print(f"No scores for this run: {err}")
            return None
        ev = ClipDinoEvaluator(**common, size=size, references=refs, clip=clip, dino=dino_model_,
                               why=f"the model draws {px or 'real'} px pictures: scored as in the DreamBooth paper "
                                   f"(DINO for the subject, CLIP-T for the prompt)")
    if verbose:
        print(f"Scoring with the {ev.name}: {ev.why}.")
    return ev
