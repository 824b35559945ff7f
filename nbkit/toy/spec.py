"""The offline model's spec, remade: its configs and a CLIP-style tokenizer trained on the toy world's words, and
the sample subject's pictures (`python -m nbkit offline`). The shipped files are in data/offline-sd and
data/instance; nbkit.models.offline loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from nbkit.models.offline import (
    OFFLINE_RESOLUTION,
    OFFLINE_SPEC,
    SAMPLE_BACKGROUNDS,
    SCHEDULER,
    TEXT_ENCODER,
    UNET,
    VAE,
)
from nbkit.paths import SAMPLE_INSTANCE_DIR
from nbkit.toy import world as toyworld


def build_tokenizer(words: list[str], dest: Path):
    """Train a CLIP-style BPE tokenizer (lower-case, `</w>` word ends, byte alphabet) on `words`; save it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    base = ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, initial_alphabet=base, end_of_word_suffix="</w>", show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)] * 8, trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) for m in learned["merges"]]
    # CLIP's layout: the byte alphabet, the same with '</w>', merged tokens in merge order, then the specials.
    vocab_list = sorted(base) + [c + "</w>" for c in sorted(base)]
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(dest)
    # Also the slow tokenizer's files, so older transformers (Colab's) load it too.
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return tok


def write_spec(dest: Path = OFFLINE_SPEC) -> None:
    """Write the offline model's spec: model_index.json, each part's config, the tokenizer."""
    tok = build_tokenizer(toyworld.vocabulary(), dest / "tokenizer")
    te = dict(TEXT_ENCODER, vocab_size=len(tok), architectures=["CLIPTextModel"], model_type="clip_text_model",
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    configs = {
        "unet/config.json": dict(UNET, _class_name="UNet2DConditionModel"),
        "vae/config.json": dict(VAE, _class_name="AutoencoderKL"),
        "text_encoder/config.json": te,
        "scheduler/scheduler_config.json": SCHEDULER,
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    }
    for rel, cfg in configs.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    """`python -m nbkit offline` (or `python -m nbkit offline`): remake the shipped spec and sample pictures."""
    import argparse

    argparse.ArgumentParser(prog="python -m nbkit offline", description="Remake the offline model's spec "
                            f"({OFFLINE_SPEC}: configs + tokenizer) and the sample instance images "
                            f"({SAMPLE_INSTANCE_DIR}).").parse_args(argv)
    write_spec()
    toyworld.write_subject_images(SAMPLE_INSTANCE_DIR, "zwx", n=5, size=OFFLINE_RESOLUTION, seed=0,
                                  backgrounds=SAMPLE_BACKGROUNDS)
    print(f"wrote {OFFLINE_SPEC} and {SAMPLE_INSTANCE_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
