"""The T4 path rehearsed on the CPU (see test_t4_rehearsal.py): what happens when a step overflows in fp16, when
a run is resumed from a checkpoint, and when a run is stopped half-way and the same parts train again."""

import pytest
import torch

from benchmarks import t4_path


@pytest.fixture(scope="module")
def rehearsal():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBKIT_T4_REHEARSAL", "1")
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("t4")


@pytest.fixture(scope="module")
def instance(offline_dir, tmp_path_factory):
    import shutil

    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    d = tmp_path_factory.mktemp("instance") / "zwx"
    shutil.copytree(SAMPLE_INSTANCE_DIR, d)
    return d


def _poison(parts, at_backward: int, what=float("inf")):
    """Make the gradient of one trained weight non-finite (or raise `what`) in the `at_backward`-th backward."""
    p = parts.unet.conv_in.weight
    calls = {"n": 0}

    def hook(g):
        calls["n"] += 1
        if calls["n"] == at_backward:
            if isinstance(what, type) and issubclass(what, BaseException):
                raise what()
            return g * what
        return g

    return p.register_hook(hook)


@pytest.mark.parametrize("case", ["dreambooth", "8gb"])
def test_an_overflowing_step_is_skipped_and_the_scale_halved(rehearsal, workdir, instance, case):
    import nbkit

    one = t4_path.run(case, workdir / f"one_{case}", instance, max_train_steps=1, validation_steps=0)
    parts = nbkit.load_parts("offline")
    handle = _poison(parts, at_backward=2)
    two = t4_path.run(case, workdir / f"two_{case}", instance, parts=parts, max_train_steps=2, validation_steps=0)
    handle.remove()
    info = two.result.info
    assert info["skipped_steps"] == [2]
    assert info["grad_scales"] == [65536.0, 32768.0]
    assert all(torch.isfinite(p).all() for p in two.result.parts.unet.parameters())
    poisoned = two.result.parts.unet.conv_in.weight
    assert torch.equal(poisoned, one.result.parts.unet.conv_in.weight)  # step 2 was not applied to it
    if case == "dreambooth":  # GradScaler skips the whole update; in backward, only the overflowed weights
        for (k, a), b in zip(two.result.parts.unet.named_parameters(), one.result.parts.unet.parameters()):
            assert torch.equal(a, b), k


def _weights(parts):
    return {k: v.detach().clone() for k, v in parts.unet.named_parameters()}


@pytest.mark.parametrize("case", ["dreambooth", "8gb"])
def test_resume_in_the_t4_path_ends_with_the_same_weights(rehearsal, workdir, instance, case):
    kw = dict(max_train_steps=3, checkpointing_steps=2, validation_steps=0)
    whole = t4_path.run(case, workdir / f"whole_{case}", instance, **kw)
    t4_path.run(case, workdir / f"cut_{case}", instance, **{**kw, "max_train_steps": 2})
    resumed = t4_path.run(case, workdir / f"cut_{case}", instance, **kw)
    assert resumed.result.info["resumed_from"] is not None
    assert resumed.result.info["grad_scales"] == whole.result.info["grad_scales"][2:]
    a, b = _weights(whole.result.parts), _weights(resumed.result.parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["dreambooth", "8gb"])
def test_a_stopped_run_leaves_the_parts_clean_and_trains_again(rehearsal, workdir, instance, case):
    import nbkit

    parts = nbkit.load_parts("offline")
    handle = _poison(parts, at_backward=2, what=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        t4_path.run(case, workdir / f"stopped_{case}", instance, parts=parts, validation_steps=0)
    handle.remove()
    params = [p for m in (parts.unet, parts.text_encoder) for p in m.parameters()]
    assert all(p.grad is None for p in params)  # no stale gradients (up to 3.2 GiB on SD 1.5)
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in params)  # no stale optimizer
    fresh = nbkit.load_parts("offline")  # the same weights, never touched by a run
    for name in ("unet", "text_encoder", "vae"):
        getattr(fresh, name).load_state_dict(getattr(parts, name).state_dict())
    again = t4_path.run(case, workdir / f"again_{case}", instance, parts=parts, validation_steps=0)
    clean = t4_path.run(case, workdir / f"clean_{case}", instance, parts=fresh, validation_steps=0)
    assert t4_path.check(again) == []
    a, b = _weights(again.result.parts), _weights(clean.result.parts)
    assert all(torch.equal(a[k], b[k]) for k in a)  # a stale optimizer's hooks would have stepped them again
