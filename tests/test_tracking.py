"""Scores while training (nbkit.scores.tracking in the one loop): metrics.json, the best model, the overfit warning,
resume."""

import json
import math
from pathlib import Path

import matplotlib
import pytest
import torch
from safetensors.torch import load_file

matplotlib.use("Agg")

import nbkit.data.images  # noqa: E402
from nbkit import load_parts, train
from nbkit.notebook import plots
from nbkit.scores import evaluate, tracking


def rows(*scores):
    """Rows at steps 0, 2, 4, ... from (subject, prompt) pairs."""
    return [{"step": 2 * i, "subject_fidelity": s, "prompt_fidelity": p, "class_drift": 0.1 * i,
             "tradeoff": evaluate.tradeoff(s, p)} for i, (s, p) in enumerate(scores)]


def test_overfit_fires_after_a_fall_from_the_peak_and_not_on_a_rise():
    rising = rows((0, 0), (0.3, 0.9), (0.5, 0.85), (0.7, 0.8), (0.8, 0.8))
    assert tracking.overfit(rising) is None and tracking.best_row(rising)["step"] == 8
    peaked = rows((0, 0), (0.5, 0.9), (0.8, 0.8), (0.9, 0.85), (0.9, 0.45), (0.95, 0.3), (1.0, 0.2))
    point = tracking.overfit(peaked)  # judged on averages of 3 evaluations: the peak is step 6's, the fall at 12
    assert point and point["step"] == 12 and point["peak"]["step"] == 6 and point["now"]["step"] == 12
    assert tracking.best_row(peaked)["step"] == 6
    msg = tracking.overfit_message(point, {"step": 6, "path": "out/best"})
    assert "started to overfit at step 12" in msg and "prompt fidelity fell from 0.85 to 0.32" in msg
    assert "subject fidelity rose from 0.73 to 0.95" in msg and "step 6 in out/best" in msg
    one_dip = rows((0, 0), (0.8, 0.8), (0.9, 0.4), (0.85, 0.8), (0.9, 0.75))  # noise, not a trend
    assert tracking.overfit(one_dip) is None
    # a real toy run with 4 seeds (scores come in quarters): up and down by one picture is noise, not overfitting
    zero, one, three = (0.0, 0.5), (0.25, 0.25), (0.75, 0.75)
    noisy = rows((0, 1), zero, zero, one, zero, zero, one, zero, zero, three, zero)
    assert tracking.overfit(noisy) is None and tracking.best_row(noisy)["step"] == 18
    # step 0 (the untrained model) is a baseline, never the best or the peak
    assert (tracking.best_row(rows((0.9, 0.9))) is None
            and tracking.overfit(rows((0.9, 0.9), (0.1, 0.1), (0.1, 0.1))) is None)


def test_eval_settings_are_checked(cfg):
    from nbkit import ConfigError

    with pytest.raises(ConfigError, match="eval_steps=-1"):
        cfg.replace(eval_steps=-1)
    with pytest.raises(ConfigError, match="eval_seeds=0"):
        cfg.replace(eval_steps=5, eval_seeds=0)
    assert tracking.subject_words(cfg) == ("zwx", "star", "")
    ti = cfg.replace(method="textual_inversion", instance_prompt="a photo of <zwx>", initializer_token="star")
    assert tracking.subject_words(ti) == ("<zwx>", "star", "<zwx>")
    dog = cfg.replace(instance_prompt="zwx on a sofa", class_prompt="a photo of a dog")
    assert tracking.subject_words(dog) == ("zwx", "dog", "zwx")
    with pytest.raises(ValueError, match="set class_prompt"):
        tracking.subject_words(cfg.replace(instance_prompt="a photo of zwx"))


def test_metric_curves_mark_the_best_step(tmp_path):
    r = rows((0, 0), (0.4, 0.9), (0.8, 0.8), (0.9, 0.5))
    (tmp_path / "metrics.json").write_text(json.dumps(r))
    ax = plots.metric_curves(tmp_path)
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["subject fidelity", "prompt fidelity", "class drift", "trade-off (harmonic mean)"]
    assert list(ax.get_lines()[0].get_xdata()) == [0, 2, 4, 6]
    assert [t.get_text() for t in ax.texts] == ["best: step 4"]
    with pytest.raises(ValueError, match="eval_steps"):
        plots.metric_curves([])


def test_lora_run_writes_metrics_and_keeps_the_best(cfg):
    """The real toy judge on the offline model: rows at the expected steps, finite, the same in the file and the
    result; the best LoRA loads on the base model."""
    c = cfg.replace(method="lora", learning_rate=1e-2, max_train_steps=3, eval_steps=2, eval_seeds=1, sample_steps=2,
                    checkpointing_steps=0)
    r = train(c, load_parts("offline"), progress=False)
    out = Path(c.output_dir)
    saved = json.loads((out / tracking.METRICS_FILE).read_text())
    assert [row["step"] for row in saved] == [0, 2, 3]  # before training, every 2 steps, the last step
    assert saved == r.metrics and all(row["scorer"] == "toy judge" for row in saved)
    for row in saved:
        assert all(math.isfinite(row[k]) and 0 <= row[k] <= 1 for k in tracking.SCORES), row
        assert row["seconds"] > 0
    assert r.best["step"] == tracking.best_row(saved)["step"] and r.best == tracking.read_best(out)
    best = Path(r.best["path"])
    assert best == out / "best" / "pytorch_lora_weights.safetensors" and all("lora" in k for k in load_file(best))
    assert r.best["method"] == "lora" and r.best["base_model"] == load_parts("offline").source
    pipe = tracking.best_pipeline(out)  # the base model with the best LoRA loaded
    lora = {n: p for n, p in pipe.unet.named_parameters() if "lora" in n}
    assert lora and any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)


def test_dreambooth_best_model_overfit_warning_and_resume(cfg, monkeypatch, capsys):
    """Scores set per step (the model really trains and is really saved): the best step is written to best/ as
    a diffusers folder holding that step's weights, the overfit warning comes once, and a run stopped at step 3
    resumes with the rows and the best model of its first session."""
    designed = {0: (0.0, 0.0), 2: (0.8, 0.8), 4: (0.9, 0.3), 6: (0.95, 0.2)}  # peak at 2, then overfit
    scored, snapshots = [], {}
    real_update, real_saver = tracking.Tracker.update, tracking.model_saver

    def update(self, step, pipe):
        scored.append(step)
        self.evaluator._step = step
        return real_update(self, step, pipe)

    def fake_score(self, images):
        s, p = designed[self._step]
        return {"subject_fidelity": s, "prompt_fidelity": p, "class_drift": 0.0}

    def saver(cfg_, parts, method):
        save = real_saver(cfg_, parts, method)

        def snap(folder):
            snapshots[scored[-1]] = {k: v.detach().clone() for k, v in parts.unet.state_dict().items()}
            return save(folder)
        return snap

    monkeypatch.setattr(tracking.Tracker, "update", update)
    monkeypatch.setattr(evaluate.JudgeEvaluator, "draw", lambda self, pipe: None)
    monkeypatch.setattr(evaluate.JudgeEvaluator, "_score", fake_score)
    monkeypatch.setattr(tracking, "model_saver", saver)
    real_batches = nbkit.data.images.batch_indices

    def stop_at_step_3(n, bs, step, seed):
        if step == 2:
            raise KeyboardInterrupt
        return real_batches(n, bs, step, seed)

    c = cfg.replace(max_train_steps=6, eval_steps=2, checkpointing_steps=2, checkpoints_total_limit=None)
    out = Path(c.output_dir)
    monkeypatch.setattr(nbkit.data.images, "batch_indices", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(c, load_parts("offline"), progress=False)
    monkeypatch.setattr(nbkit.data.images, "batch_indices", real_batches)
    first = json.loads((out / tracking.METRICS_FILE).read_text())
    assert scored == [0, 2] and [row["step"] for row in first] == [0, 2]
    ckpt = json.loads((out / "checkpoints" / "step_000002" / "checkpoint.json").read_text())
    assert ckpt["metrics"] == first and ckpt["best"]["step"] == 2
    capsys.readouterr()

    r = train(c, load_parts("offline"), progress=False)
    said = capsys.readouterr().out
    assert scored == [0, 2, 4, 6]  # resumed: steps 0 and 2 are not scored again
    assert [row["step"] for row in r.metrics] == [0, 2, 4, 6] and r.metrics[:2] == first
    assert json.loads((out / tracking.METRICS_FILE).read_text()) == r.metrics
    assert said.count("started to overfit") == 1 and "at step 4" in said
    assert f"best model so far is step 2 in {out / 'best'}" in said
    assert r.best["step"] == 2 and r.best["tradeoff"] == pytest.approx(0.8)
    assert list(snapshots) == [2]  # saved once, when step 2 was scored (the first session)
    from diffusers import UNet2DConditionModel

    best_unet = UNet2DConditionModel.from_pretrained(out / "best" / "unet").state_dict()
    assert tracking.best_pipeline(r).unet.state_dict().keys() == best_unet.keys()
    assert all(torch.equal(best_unet[k], v) for k, v in snapshots[2].items())  # that step's weights, bit for bit
    final = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(final[k], v) for k, v in snapshots[2].items())  # training went on after it
    assert tracking.read_best(out)["step"] == 2
    from nbkit.models.layout import layout_problems

    assert layout_problems(out / "best") == [] == layout_problems(out / "model")  # transformers 4.x reads both


def test_table_lists_every_scored_step_and_marks_the_best():
    from nbkit.scores.tracking import table

    rows = [dict(step=0, subject_fidelity=0.0, prompt_fidelity=0.9, class_drift=0.0, tradeoff=0.0, scorer="toy judge"),
            dict(step=100, subject_fidelity=0.8, prompt_fidelity=0.7, class_drift=0.2, tradeoff=0.75,
                 scorer="toy judge"),
            dict(step=200, subject_fidelity=0.9, prompt_fidelity=0.3, class_drift=0.5, tradeoff=0.45,
                 scorer="toy judge")]
    lines = table(rows).splitlines()
    assert len(lines) == 1 + 3 + 1 and "toy judge" in lines[-1]
    assert lines[2].startswith("   100") and lines[2].endswith("<- best")
    assert "<- best" not in lines[1] + lines[3] and "0.75" in lines[2]


def test_overfit_message_says_stayed_when_a_score_did_not_move():
    from nbkit.scores.tracking import overfit_message

    peak = dict(step=300, subject_fidelity=0.11, prompt_fidelity=1.0, class_drift=1.0)
    now = dict(step=400, subject_fidelity=0.08, prompt_fidelity=1.0, class_drift=1.0)
    msg = overfit_message(dict(step=400, peak=peak, now=now, window=3), None)
    assert "subject fidelity fell from 0.11 to 0.08 while prompt fidelity stayed at 1.00" in msg, msg
