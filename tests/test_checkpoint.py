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

import nbkit.data.images
from nbkit import load_parts, train
from nbkit.safeio import save_tensors
from nbkit.training.checkpoint import (
    INFO,
    Checkpoints,
    Resumable,
    ResumeError,
    check_compatible,
    is_complete,
    restore,
    step_of,
)
from nbkit.training.optim import InBackwardOptimizer

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
    real = nbkit.data.images.batch_indices

    def stop_at_step_3(n, bs, step, seed):
        if step == 2:  # 0-based: the third step
            raise KeyboardInterrupt
        return real(n, bs, step, seed)

    monkeypatch.setattr(nbkit.data.images, "batch_indices", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(c, load_parts("offline"), progress=False)
    monkeypatch.setattr(nbkit.data.images, "batch_indices", real)
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


def test_any_optimizer_state_round_trips_exactly_through_json(tmp_path):
    """Any nesting, int and tuple keys, tuples, uint8 tensors, one tensor reached twice, no "state" key at all
    (DeepSpeed's ZeRO optimizer has none; the optimizer in backward has a list of state dicts)."""
    from nbkit.safeio import join_tree, load_sharded, save_sharded, split_tree

    shared = torch.randn(3)
    sd = {"optimizers": [{"state": {0: {"step": torch.tensor(3.0), "q": {"state1": torch.arange(6, dtype=torch.uint8),
                                                                       "absmax1": torch.ones(2)}}},
                          "param_groups": [{"betas": (0.9, 0.999), "lr": 0.1, "params": [0], "fused": None}]}],
          "single_partition_of_fp32_groups": [shared, shared], (1, "a"): float("inf"), "good_steps": 2,
          "a/b": torch.zeros(1), "a": {"b": torch.ones(1)}}
    tensors, rest = split_tree(sd)
    names = save_sharded(tensors.items(), tmp_path, "optimizer")
    back = join_tree(json.loads(json.dumps(rest)), load_sharded(tmp_path, names))
    assert back.keys() == sd.keys() and list(back["optimizers"][0]["state"]) == [0]  # int keys stay ints
    assert back["optimizers"][0]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    q = back["optimizers"][0]["state"][0]["q"]
    assert q["state1"].dtype == torch.uint8 and torch.equal(q["state1"], torch.arange(6, dtype=torch.uint8))
    a, b = back["single_partition_of_fp32_groups"]
    assert a is b and torch.equal(a, shared)  # stored once, one tensor again
    assert torch.equal(back["a/b"], torch.zeros(1)) and torch.equal(back["a"]["b"], torch.ones(1))
    assert back[(1, "a")] == float("inf") and back["good_steps"] == 2
    with pytest.raises(TypeError, match="optimizers/0/loss_scaler holds a builtins.object"):
        split_tree({"optimizers": [{"loss_scaler": object()}]})


def test_deepspeed_optimizer_is_refused_with_what_to_do(tmp_path):
    from nbkit.training.checkpoint import optimizer_state

    zero = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2",
                                               "state_dict": lambda self: {}})()
    wrapped = type("AcceleratedOptimizer", (), {"optimizer": zero})()
    with pytest.raises(ResumeError, match="checkpointing_steps=0"):
        optimizer_state(wrapped)
    model, res = tiny()
    with pytest.raises(ResumeError, match="not supported"):
        Checkpoints(tmp_path / "ckpts").save(1, Resumable(res.params, wrapped, res.lr_scheduler), {})
    assert not (tmp_path / "ckpts").exists()  # refused before anything was written
    assert optimizer_state(res.optimizer) == res.optimizer.state_dict()


def test_format_1_checkpoints_still_restore(tmp_path):
    """Checkpoints written before format 2 kept {"state", "param_groups"} with {"tensor": name} leaves."""
    model, res = tiny()
    step(model, res)
    path = Checkpoints(tmp_path).save(1, res, {})
    info = json.loads((path / INFO).read_text())
    sd = res.optimizer.state_dict()
    info["format"] = 1
    info["optimizer"] = {"state": {str(i): {k: {"tensor": f"state/{i}/{k}"} for k in s}
                                   for i, s in sd["state"].items()},
                         "param_groups": json.loads(json.dumps(sd["param_groups"]))}
    save_tensors({f"state/{i}/{k}": v for i, s in sd["state"].items() for k, v in s.items()},
                 path / info["optimizer_files"][0])
    info["files"] = {p.name: p.stat().st_size for p in path.iterdir() if p.name != INFO}
    (path / INFO).write_text(json.dumps(info))
    model2, res2 = tiny(seed=1)
    restore(path, res2)
    assert_same_state(res2.optimizer.state_dict(), sd)


# --- any optimizer: torch AdamW, the optimizer in backward, bitsandbytes' 8-bit AdamW ------------------------------

def make_opt(kind, params):
    import bitsandbytes as bnb

    one = (lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2)) if kind.endswith("8bit") else (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    return InBackwardOptimizer(params, one) if kind.startswith("in_backward") else one(list(params))


def assert_same_state(a, b, where="state dict"):
    """The same structure and types, every tensor equal in dtype and values."""
    assert type(a) is type(b), (where, type(a), type(b))
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def tensors_of(x):
    if torch.is_tensor(x):
        return [x]
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return [t for v in items for t in tensors_of(v)]


@pytest.mark.parametrize("kind", ["adamw", "in_backward", "adamw8bit", "in_backward_8bit"])
def test_every_optimizer_state_survives_save_and_restore(tmp_path, kind):
    def run(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Linear(64, 2))  # 5120 weights: 8-bit state
        opt = make_opt(kind, model.parameters())
        sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
        return model, Resumable(dict(model.named_parameters()), opt, sched)

    def train_step(model, res, x=None):
        model(torch.randn(8, 80) if x is None else x).pow(2).mean().backward()  # in backward: the hooks step here
        res.optimizer.step()
        res.lr_scheduler.step()
        res.optimizer.zero_grad()

    model, res = run(0)
    for _ in range(2):
        train_step(model, res)
    saved = res.optimizer.state_dict()
    if kind.endswith("8bit"):  # the 8-bit moments and their quantization maps are really in there
        dtypes = {t.dtype for t in tensors_of(saved)}
        assert torch.uint8 in dtypes and torch.float32 in dtypes, dtypes
    path = Checkpoints(tmp_path).save(2, res, {})
    model2, res2 = run(1)  # a fresh process: other weights, a fresh optimizer, other RNG state
    restore(path, res2)
    assert_same_state(res2.optimizer.state_dict(), saved)
    x = torch.randn(8, 80)
    train_step(model, res, x)
    train_step(model2, res2, x)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert_same_state(res2.optimizer.state_dict(), res.optimizer.state_dict())


def test_optimizer_in_backward_run_resumes_to_the_same_weights(cfg, tmp_path):
    """The 8gb preset's optimizer (in backward) through a checkpoint: the run continued from it ends bit for bit
    where the run never stopped ends."""
    c = cfg.replace(optimizer_in_backward=True, max_grad_norm=0.0, max_train_steps=3, checkpointing_steps=1,
                    checkpoints_total_limit=None, output_dir=str(tmp_path / "whole"))
    whole = train(c, load_parts("offline"), progress=False)
    assert whole.info["optimizer_in_backward"]
    first = Path(c.output_dir) / "checkpoints" / "step_000001"
    assert is_complete(first)
    resumed = train(c.replace(output_dir=str(tmp_path / "resumed"), resume=str(first)), load_parts("offline"),
                    progress=False)
    assert resumed.info["resumed_from"] == first and resumed.info["optimizer_in_backward"]
    assert resumed.losses == whole.losses
    assert_same(unet_file(resumed.output_dir), unet_file(whole.output_dir), atol=0)


def test_changed_settings_are_refused_before_the_model_loads(cfg, tmp_path):
    model, res = tiny()
    Checkpoints(tmp_path / "out" / "checkpoints").save(2, res, {"config": cfg.to_dict()})
    with pytest.raises(ResumeError, match="learning_rate: 0.001 in the checkpoint, 0.0005 now"):
        train(cfg.replace(learning_rate=5e-4, model=str(tmp_path / "no-such-model")))  # a load would fail otherwise
