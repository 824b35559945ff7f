"""Reproducibility: the same seed and settings give the same weights and images run to run, and a manifest says how."""

import json
import random

import numpy as np
import torch
from safetensors.torch import load_file

from nbkit import generate, load_parts, train
from nbkit.training import manifest


def test_same_seed_same_weights_and_images_and_a_manifest(cfg, tmp_path):
    c = cfg.replace(method="lora", learning_rate=1e-2, validation_prompts=["a photo of zwx star"], validation_steps=2,
                    num_validation_images=2, sample_steps=2)
    runs = []
    for name, noise in (("a", 123), ("b", 456)):  # whatever the global RNGs held before: the seed decides
        torch.manual_seed(noise)
        random.seed(noise)
        np.random.seed(noise)
        runs.append(train(c.replace(output_dir=str(tmp_path / name)), load_parts("offline"), progress=False))
    a, b = runs
    wa, wb = load_file(a.saved), load_file(b.saved)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # the LoRA init too
    assert a.validation[2].read_bytes() == b.validation[2].read_bytes()
    ia = generate(a.pipeline(), ["a photo of zwx star"], seeds=[0, 1], steps=3)
    ib = generate(b.pipeline(), ["a photo of zwx star"], seeds=[0, 1], steps=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(ia, ib))

    m = json.loads((a.output_dir / manifest.FILE).read_text())
    for lib in ("python", "torch", "diffusers", "transformers", "accelerate", "peft"):
        assert m["versions"][lib], lib
    assert m["device"]["device"] == "cpu" and m["device"]["precision"] == "no"
    assert m["config"] == c.replace(output_dir=str(tmp_path / "a")).to_dict()
    assert m["status"] == "finished" and m["steps_done"] == 2 and m["resumed_from"] is None
    assert m["started"] <= m["ended"] and len(m["sessions"]) == 1
    assert a.info["manifest"] == a.output_dir / manifest.FILE
    text = manifest.summary(a.output_dir)
    assert "torch " in text and "2/2 steps" in text and "finished" in text
