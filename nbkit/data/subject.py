"""What a notebook trains on, decided once: INSTANCE_DIR and CLASS_NOUN -> the subject's folder and class noun.

`INSTANCE_DIR = "sample"` means the kit's example subject, and which one depends on the model:

- the offline model: the kit's toy star (data/instance/zwx_star), class noun "star": a subject of its own toy world,
  the only pictures it can learn from and be judged on;
- a real model (Stable Diffusion 1.5): the diffusers docs' dog photos (the hub dataset diffusers/dog-example, five
  photos), downloaded once into the kit cache and checked with the kit's image loader, class noun "dog";
- a real model and the dog photos cannot be had (no hub, the download failed): the notebook stops, saying what
  happened and what to do. Decided: stop, not fall back to the toy star. Stable Diffusion trained on 64 px toy
  shapes blown up to 512 px learns a blurred sticker: GPU minutes spent on pictures that show nothing the
  notebook explains, and a learner who may think DreamBooth failed. The setup cell is the first one: running it
  again with a folder of photos costs nothing.

Any other INSTANCE_DIR is the learner's own folder, used as given; `CLASS_NOUN = "auto"` follows the sample subject
only, so for an own folder the class noun must be named (a clear error says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nbkit.config import ConfigError
from nbkit.data.images import IMAGE_SUFFIXES, DataError, load_folder
from nbkit.env import runtime
from nbkit.paths import SAMPLE_INSTANCE_DIR, cache_dir

SAMPLE = "sample"  # INSTANCE_DIR naming the kit's example subject
AUTO = "auto"  # CLASS_NOUN following the subject
TOY_NOUN = "star"  # the toy subject's class (pictures of "zwx star")
DOG_DATASET = "diffusers/dog-example"  # the diffusers DreamBooth docs' example photos (a dataset repo)
DOG_NOUN = "dog"
DONE = ".nbkit-complete"  # written into the download folder once its pictures were all read (hidden: not a picture)
# only the pictures: the repo also holds .gitattributes (and may hold a README); the loader checks what came
PATTERNS = sorted({f"*{s}" for s in IMAGE_SUFFIXES} | {f"*{s.upper()}" for s in IMAGE_SUFFIXES})


@dataclass(frozen=True)
class Subject:
    """The pictures a notebook trains on and what they show."""

    instance_dir: Path  # the folder of pictures
    class_noun: str  # the class the subject belongs to: "star", "dog", or the learner's CLASS_NOUN
    kind: str  # "toy" (the kit's toy star), "dog" (the downloaded dog photos) or "own" (the learner's folder)
    why: str  # one line: which subject the notebook got and why (printed by nb.setup)


def dog_dir() -> Path:
    """Where the dog photos are kept once downloaded: the kit cache (NBKIT_CACHE)."""
    return cache_dir() / "subjects" / "dog-example"


def is_auto(class_noun: str | None) -> bool:
    return class_noun is None or class_noun.strip().lower() in (AUTO, "")


def choose(instance_dir: str | Path, class_noun: str | None, offline_model: bool, model: str = "") -> Subject:
    """The subject for INSTANCE_DIR (`"sample"` or a folder) and CLASS_NOUN (`"auto"` or a word) on a model.

    `offline_model`: the kit's small offline model (else a real one, `model` naming it in messages). Raises
    ConfigError for an own folder with CLASS_NOUN "auto", DataError when a real model's sample photos cannot be had.
    """
    auto = is_auto(class_noun)
    noun = "" if auto else class_noun.strip()
    if str(instance_dir) != SAMPLE:
        if auto:
            raise ConfigError(f'CLASS_NOUN = "auto" follows the kit\'s sample subject (INSTANCE_DIR = "sample": '
                              f'"{TOY_NOUN}" on the offline model, "{DOG_NOUN}" on Stable Diffusion); for your own '
                              f"pictures in {str(instance_dir)!r} it cannot guess. Set CLASS_NOUN to what they show, "
                              'one common word: "dog", "cat", "person", "toy", "mug".')
        return Subject(Path(instance_dir), noun, "own",
                       f"Subject: your pictures in {instance_dir}, class noun {noun!r} (CLASS_NOUN).")
    if offline_model:
        return Subject(Path(SAMPLE_INSTANCE_DIR), noun or TOY_NOUN, "toy",
                       f"Subject: the kit's toy star ({SAMPLE_INSTANCE_DIR}), class noun {noun or TOY_NOUN!r}"
                       f"{_as_set(noun, TOY_NOUN)}: on the offline model INSTANCE_DIR = \"sample\" is a subject of "
                       "its own toy world, the pictures it can learn and be judged on.")
    folder, n = fetch_dog_photos(model=model)
    return Subject(folder, noun or DOG_NOUN, "dog",
                   f"Subject: the diffusers docs' dog photos ({n} pictures, hub dataset {DOG_DATASET}, in {folder}), "
                   f"class noun {noun or DOG_NOUN!r}{_as_set(noun, DOG_NOUN)}: on {model or 'a real model'} "
                   "INSTANCE_DIR = \"sample\" means real photos (the toy star is for the offline model).")


def _as_set(noun: str, shown: str) -> str:
    """What the line adds when CLASS_NOUN was set to something else than what the sample pictures show."""
    if not noun or noun == shown:
        return ""
    return f' as CLASS_NOUN says (the pictures show a {shown}: CLASS_NOUN = "auto" follows the subject)'


def fetch_dog_photos(folder: str | Path | None = None, model: str = "") -> tuple[Path, int]:
    """The dog photos in `folder` (default: dog_dir()), downloaded if they are not there yet; (folder, pictures).

    Read back with the kit's image loader before use (and after every download): only pictures are fetched, and a
    file that came broken stops here, named, not mid-training. Raises DataError saying what to do when they
    cannot be had."""
    folder = Path(folder or dog_dir())
    if (folder / DONE).is_file():
        try:
            return folder, len(load_folder(folder, 0, "sample"))
        except DataError:
            pass  # damaged since: fetch it again
    if not runtime.hub_reachable():
        raise DataError(_unavailable("the model hub cannot be reached (no network, or HF_HUB_OFFLINE is set)",
                                     folder, model))
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(DOG_DATASET, repo_type="dataset", local_dir=str(folder), allow_patterns=PATTERNS)
    except Exception as err:  # noqa: BLE001 - network, hub, offline mode, disk: one message, the cause in it
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(_unavailable(f"downloading them failed ({type(err).__name__}: {first})", folder,
                                     model)) from err
    try:
        n = len(load_folder(folder, 0, "downloaded sample"))
    except DataError as err:
        raise DataError(_unavailable(f"what came cannot all be read:\n{err}\n", folder, model)) from err
    (folder / DONE).write_text(f"{DOG_DATASET}: {n} pictures\n")
    return folder, n


def _unavailable(what: str, folder: Path, model: str) -> str:
    """The message when a real model's sample photos cannot be had: what happened, why it stops, what to do."""
    return (f'INSTANCE_DIR = "sample" on {model or "a real model"} means real photos: the diffusers docs\' dog '
            f"photos (hub dataset {DOG_DATASET}). But {what}.\n"
            "The notebook stops here rather than train Stable Diffusion on the offline model's 64 px toy star: it "
            "would learn a blurred sticker, nothing this notebook shows. What to do, one of:\n"
            f"  - connect to the internet and run this cell again (the photos are kept in {folder});\n"
            '  - use your own photos: INSTANCE_DIR = "my_photos" (a folder of 3-10 photos of one subject: upload them '
            'there, or with UPLOAD = True where the notebook has it) and CLASS_NOUN = what they show ("dog", "cat", '
            '"person");\n'
            f'  - only to watch the steps run: MODEL = "offline", or INSTANCE_DIR = "{SAMPLE_INSTANCE_DIR}" with '
            f'CLASS_NOUN = "{TOY_NOUN}".')
