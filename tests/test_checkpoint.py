"""Resume: a run killed part-way (a real process, a real signal) continues to the same weights as one never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

import nbkit.data
from nbkit import load_parts, train
from nbkit.checkpoint import (INFO, Checkpoints, ResumeError, Resumable, check_compatible, is_complete, restore,
                              step_of)

ROOT = Path(__file__).resolve().parent.parent


def unet_file(out):
    return load_file(Path(out) / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def test_killed_process_resumes_to_the_same_weights(cfg, tmp_path, capsys):
    c = cfg.replace(max_train_steps=4, checkpointing_steps=2, output_dir=str(tmp_path / "killed"))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "_train_worker.py"), json.dumps(c.to_dict()), "1.0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = Path(c.output_dir) / "checkpoints" / "step_000002"
    deadline = time.time() + 600
    while not is_complete(first):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no cleanup of any kind: the worst case
    proc.wait()
    out = Path(c.output_dir)
    assert not (out / "model").exists(), "killed before the end"
    assert json.loads((out / "run_manifest.json").read_text())["status"] == "running"
    # what a kill during the next checkpoint leaves behind is never picked up
    (out / "checkpoints" / ".tmp-step_000004-99999").mkdir()
    (out / "checkpoints" / ".tmp-step_000004-99999" / "weights-00001.safetensors").write_bytes(b"half")
    (out / "checkpoints" / "step_000004").mkdir()  # renamed but unsynced (a Drive copy): no checkpoint.json

    with pytest.warns(UserWarning, match="step_000004 is incomplete"):
        resumed = train(c, load_parts("offline"), progress=False)
    said = capsys.readouterr().out
    assert "Resuming from" in said and "step_000002" in said and "(step 2 of 4)" in said
    assert resumed.info["resumed_from"].name == "step_000002"
    assert not (out / "checkpoints" / ".tmp-step_000004-99999").exists()

    whole = train(cfg.replace(max_train_steps=4, checkpointing_steps=2, output_dir=str(tmp_path / "whole")),
                  load_parts("offline"), progress=False)
    assert resumed.losses == whole.losses
    assert_same(unet_file(resumed.output_dir), unet_file(whole.output_dir))  # in practice bit for bit
    m = json.loads((out / "run_manifest.json").read_text())
    assert m["status"] == "finished" and m["resumed_at_step"] == 2 and m["steps_done"] == 4
    assert m["resumed_from"].endswith("step_000002")


def test_resume_continues_the_loss_log_and_validation_grids(cfg, tmp_path, monkeypatch, capsys):
    """LoRA, interrupted in-process (the stop button) at step 3, checkpoint at 2, validation every step."""
    c = cfg.replace(method="lora", learning_rate=1e-2, max_train_steps=4, checkpointing_steps=2,
                    validation_prompts=["a photo of zwx star"], validation_steps=1, num_validation_images=1,
                    sample_steps=2, output_dir=str(tmp_path / "stopped"))
    real = nbkit.data.batch_indices

    def stop_at_step_3(n, bs, step, seed):
        if step == 2:  # 0-based: the third step
            raise KeyboardInterrupt
        return real(n, bs, step, seed)

    monkeypatch.setattr(nbkit.data, "batch_indices", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(c, load_parts("offline"), progress=False)
    monkeypatch.setattr(nbkit.data, "batch_indices", real)
    out = Path(c.output_dir)
    assert [r["step"] for r in json.loads((out / "losses.json").read_text())] == [1, 2]  # written with the checkpoint
    m = json.loads((out / "run_manifest.json").read_text())
    assert m["status"] == "interrupted" and m["steps_done"] == 2

    resumed = train(c, load_parts("offline"), progress=False)
    assert "Resuming from" in capsys.readouterr().out
    whole = train(c.replace(output_dir=str(tmp_path / "whole")), load_parts("offline"), progress=False)

    log_r = json.loads((out / "losses.json").read_text())
    log_w = json.loads((Path(whole.output_dir) / "losses.json").read_text())
    assert [r["step"] for r in log_r] == [1, 2, 3, 4] and log_r == log_w
    assert sorted(resumed.validation) == sorted(whole.validation) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed.validation[step].read_bytes() == whole.validation[step].read_bytes(), step
    assert_same(load_file(resumed.saved), load_file(whole.saved))
    sessions = json.loads((out / "run_manifest.json").read_text())["sessions"]
    assert [(s["status"], s["steps_done"]) for s in sessions] == [("interrupted", 2), ("finished", 4)]
    # a LoRA checkpoint holds the adapters only
    ckpt = out / "checkpoints" / "step_000004"
    weights = {k for n in json.loads((ckpt / INFO).read_text())["weights"] for k in load_file(ckpt / n)}
    assert weights and all("lora" in k for k in weights)


def test_textual_inversion_checkpoint_holds_the_embedding_and_resumes(cfg, tmp_path):
    c = cfg.replace(method="textual_inversion", instance_prompt="a photo of <zwx>", learning_rate=5e-2,
                    max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=None,
                    output_dir=str(tmp_path / "a"))
    whole = train(c, load_parts("offline"), progress=False)
    first = Path(c.output_dir) / "checkpoints" / "step_000001"
    info = json.loads((first / INFO).read_text())
    weights = load_file(first / info["weights"][0])
    assert len(weights) == 1 and next(iter(weights)).endswith("token_embedding.weight")  # the embedding only
    resumed = train(c.replace(output_dir=str(tmp_path / "b"), resume=str(first)), load_parts("offline"),
                    progress=False)
    assert resumed.losses == whole.losses
    assert_same(load_file(resumed.saved), load_file(whole.saved), atol=0)


# --- units: no training ---------------------------------------------------------------------------------------

def tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    return model, Resumable(dict(model.named_parameters()), opt, sched)


def step(model, res):
    model(torch.randn(4, 3)).pow(2).sum().backward()  # draws from the global RNG: restored with the checkpoint
    res.optimizer.step()
    res.lr_scheduler.step()
    res.optimizer.zero_grad()


def test_round_trip_is_exact_and_the_limit_keeps_the_newest(tmp_path):
    model, res = tiny()
    ckpts = Checkpoints(tmp_path, limit=2)
    for s in (1, 2, 3):
        step(model, res)
        ckpts.save(s, res, {"config": {}, "log": [{"step": s}]})
    assert [p.name for p in ckpts.complete()] == ["step_000002", "step_000003"]
    files = {p.name for p in (tmp_path / "step_000003").iterdir()}
    assert files == {INFO, "rng.safetensors", "weights-00001.safetensors", "optimizer-00001.safetensors"}
    for _ in range(3):
        step(model, res)
    after = {k: v.clone() for k, v in model.state_dict().items()}

    model2, res2 = tiny(seed=1)  # a fresh process: other weights, other RNG state
    restore(tmp_path / "step_000003", res2)
    for _ in range(3):
        step(model2, res2)
    assert all(torch.equal(after[k], v) for k, v in model2.state_dict().items())
    assert res2.lr_scheduler.get_last_lr() == res.lr_scheduler.get_last_lr()
    assert isinstance(res2.optimizer.param_groups[0]["betas"], tuple)


def test_only_complete_checkpoints_are_picked(tmp_path):
    model, res = tiny()
    ckpts = Checkpoints(tmp_path)
    step(model, res)
    good = ckpts.save(1, res, {})
    ckpts.save(2, res, {})
    (tmp_path / "step_000002" / "weights-00001.safetensors").write_bytes(b"truncated")  # a short file
    (tmp_path / ".tmp-step_000003-1").mkdir()
    (tmp_path / "step_000009").mkdir()
    (tmp_path / "step_000010").mkdir()
    (tmp_path / "step_000010" / INFO).write_text("{not json")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ckpts.latest() == good and ckpts.find("auto") == good
    assert {Path(str(x.message).split(" is ")[0]).name for x in w} == {"step_000002", "step_000009", "step_000010"}
    with pytest.raises(ResumeError, match="not a complete checkpoint folder"):
        ckpts.find(str(tmp_path / "step_000002"))
    assert ckpts.find(None) is None and step_of(good) == 1


def test_start_over_replaces_old_checkpoints_only_when_the_new_one_exists(tmp_path, capsys):
    model, res = tiny()
    Checkpoints(tmp_path).save(5, res, {})
    fresh = Checkpoints(tmp_path, limit=3)
    fresh.start_over()
    assert "will be deleted when this run writes its first checkpoint" in capsys.readouterr().out
    assert (tmp_path / "step_000005").exists()  # nothing lost before the new run has a checkpoint
    fresh.save(2, res, {})
    assert [p.name for p in fresh.complete()] == ["step_000002"]


def test_other_settings_or_data_refuse_to_resume_and_say_what_to_do(cfg, tmp_path):
    info = {"step": 2, "config": cfg.to_dict(), "data": {"instance": {"count": 5, "sha256": "a"}}}
    data = {"instance": {"count": 5, "sha256": "a"}}
    assert check_compatible(info, cfg, data, tmp_path) == []
    notes = check_compatible(info, cfg.replace(max_train_steps=8, mixed_precision="no", validation_steps=3), data,
                             tmp_path)
    assert notes == ["max_train_steps changed: 2 -> 8", "mixed_precision changed: 'auto' -> 'no'"]
    with pytest.raises(ResumeError) as e:
        check_compatible(info, cfg.replace(learning_rate=5e-6, seed=3), {"instance": {"count": 6, "sha256": "b"}},
                         tmp_path)
    msg = str(e.value)
    for part in ("learning_rate: 0.001 in the checkpoint, 5e-06 now", "seed: 0 in the checkpoint, 3 now",
                 "instance pictures or their captions changed (5 then, 6 now)", "resume=None", "new output_dir"):
        assert part in msg
    with pytest.raises(ResumeError, match="beyond max_train_steps=1"):
        check_compatible(info, cfg.replace(max_train_steps=1), data, tmp_path)


def test_nested_optimizer_state_round_trips(tmp_path):
    """bitsandbytes' 8-bit AdamW nests its quantization tensors in a dict inside each parameter's state."""
    from nbkit.checkpoint import _join_optimizer, _split_optimizer
    from nbkit.safeio import load_sharded, save_sharded

    model, res = tiny()
    sd = {"state": {0: {"step": 3, "q": {"state1": torch.arange(6, dtype=torch.uint8), "absmax1": torch.ones(2)}},
                    1: {"exp_avg": torch.randn(2)}},
          "param_groups": res.optimizer.state_dict()["param_groups"]}
    tensors, rest = _split_optimizer(sd)
    json.dumps(rest)  # the rest is plain JSON
    names = save_sharded(tensors, tmp_path, "optimizer")
    back = _join_optimizer(json.loads(json.dumps(rest)), load_sharded(tmp_path, names), res.optimizer)
    assert back["state"][0]["step"] == 3 and torch.equal(back["state"][0]["q"]["state1"], sd["state"][0]["q"]["state1"])
    assert torch.equal(back["state"][1]["exp_avg"], sd["state"][1]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)


def test_changed_settings_are_refused_before_the_model_loads(cfg, tmp_path):
    model, res = tiny()
    Checkpoints(tmp_path / "out" / "checkpoints").save(2, res, {"config": cfg.to_dict()})
    with pytest.raises(ResumeError, match="learning_rate: 0.001 in the checkpoint, 0.0005 now"):
        train(cfg.replace(learning_rate=5e-4, model=str(tmp_path / "no-such-model")))  # a load would fail otherwise
