"""Two toy subjects in one run (concepts_list), each scored by the toy judge: the measured line of docs/findings.md.

    python -m benchmarks.two_subjects            # ~4 min on 2 CPU cores (OMP_NUM_THREADS=1)
    python -m benchmarks.two_subjects --alone    # the second subject alone, for comparison

zwx (the sample subject, an orange striped star) and qlo (a yellow dotted circle, 5 pictures on backgrounds it is never
scored on), DreamBooth of the UNet at the sweet spot's LR 5e-4, batch 4; scored after 400 and 800 steps (the second
run resumes the first: the rate is constant), 8 seeds, DDIM 20 steps. Then which subject each identifier draws, also
with the other one's class noun ("a photo of zwx circle"): do the identifiers keep the subjects apart?
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from nbkit import load_parts
from nbkit.config import TrainConfig
from nbkit.models.offline import OFFLINE_BATCH_SIZE, SAMPLE_INSTANCE_DIR
from nbkit.sample.sampling import generate
from nbkit.toy import judge
from nbkit.toy import world as toyworld
from nbkit.training.loop import train

NOUN = {"zwx": "star", "qlo": "circle"}
SAMPLE = dict(steps=20, guidance=7.5, scheduler="ddim")


def run(work: Path, alone: bool = False) -> dict:
    qlo = work / "qlo"
    toyworld.write_subject_images(qlo, "qlo", n=5, size=64, seed=0, backgrounds=("white", "blue", "black"))
    dirs = {"zwx": SAMPLE_INSTANCE_DIR, "qlo": qlo}
    if alone:
        kw, words, steps = dict(instance_dir=str(qlo), instance_prompt="a photo of qlo circle", identifier="qlo"), \
            ["qlo"], (200, 400)
    else:
        kw = dict(concepts_list=[{"instance_dir": str(dirs[w]), "instance_prompt": f"a photo of {w} {n}"}
                                 for w, n in NOUN.items()])
        words, steps = list(NOUN), (400, 800)
    out = {}
    for n in steps:
        cfg = TrainConfig(model="offline", output_dir=str(work / "run"), resolution=64, max_train_steps=n,
                          learning_rate=5e-4, train_batch_size=OFFLINE_BATCH_SIZE, checkpointing_steps=steps[0],
                          validation_steps=0, report_to="none", **kw)
        t = time.perf_counter()
        pipe = train(cfg, load_parts("offline"), progress=False).pipeline("ddim")
        out[n] = {w: judge.scores(pipe, identifier=w, class_noun=NOUN[w], subject=w, seeds=8, **SAMPLE) for w in words}
        out[n]["seconds"] = round(time.perf_counter() - t)
        print(n, json.dumps(out[n]), flush=True)
    if not alone:  # what each identifier draws with each class noun
        prompts = [f"a photo of {w} {n}" for w in NOUN for n in NOUN.values()]
        out["drawn"] = {p: {" ".join(k): v for k, v in Counter(
            (s["colour"], s["pattern"], s["shape"]) for s in judge.predict(generate(
                pipe, p, seeds=list(range(8)), size=64, **SAMPLE))).items()} for p in prompts}
        print(json.dumps(out["drawn"], indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.two_subjects", description=__doc__.split("\n\n")[0])
    ap.add_argument("--alone", action="store_true", help="train the second subject alone (200 and 400 steps)")
    run(Path(tempfile.mkdtemp(prefix="two-subjects-")), ap.parse_args(argv).alone)


if __name__ == "__main__":
    main()
