"""Optimizer in backward: same weights as the normal path, no gradient buffers, clean fallbacks, fp16 scaling."""

import pytest
import torch

from nbkit import load_parts, train
from nbkit.training.optim import InBackwardOptimizer, in_backward_active, make_optimizer


def _weights(parts):
    return {f"{n}.{k}": v.detach().clone() for n in ("unet", "text_encoder")
            for k, v in getattr(parts, n).state_dict().items()}


@pytest.mark.parametrize("changes", [
    dict(method="dreambooth", train_text_encoder=True),
    dict(method="textual_inversion", instance_prompt="a photo of <zwx>", learning_rate=5e-2),
], ids=["dreambooth+te", "ti"])
def test_in_backward_gives_the_same_weights_as_the_normal_path(cfg, changes):
    base = cfg.replace(max_grad_norm=0.0, max_train_steps=3, lr_scheduler="cosine", lr_warmup_steps=1, resolution=32,
                       **changes)
    normal = train(base, load_parts("offline"), progress=False)
    fused = train(base.replace(optimizer_in_backward=True, output_dir=cfg.output_dir + "-ib"), load_parts("offline"),
                  progress=False)
    assert fused.info["optimizer_in_backward"] and not normal.info["optimizer_in_backward"]
    assert fused.losses == pytest.approx(normal.losses, rel=1e-5, abs=1e-7)
    a, b = _weights(normal.parts), _weights(fused.parts)
    assert a.keys() == b.keys()
    start = _weights(load_parts("offline"))
    moved = [k for k in a if k in start and not torch.equal(a[k], start[k])]
    assert moved, "training changed nothing: the comparison would be empty"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    params = [p for n in ("unet", "text_encoder") for p in getattr(fused.parts, n).parameters()]
    assert all(p.grad is None for p in params), "no gradient buffer may remain"


def test_in_backward_holds_one_gradient_at_a_time():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)])
    live = []
    params = list(model.parameters())

    def count(_p):
        live.append(sum(q.grad is not None for q in params))

    for p in params:  # registered first: runs before the optimizer's hook, when this gradient is complete
        p.register_post_accumulate_grad_hook(count)
    opt = InBackwardOptimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    before = [p.detach().clone() for p in params]
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    assert max(live) == 1 and len(live) == len(params)  # each gradient freed before the next is complete
    assert opt.steps_in_backward == len(params)
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    opt.remove_hooks()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    assert all(p.grad is not None for p in params)  # detached: an ordinary backward again


def test_scheduler_drives_every_per_parameter_optimizer():
    from diffusers.optimization import get_scheduler

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = InBackwardOptimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1.0))
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
    assert [o.param_groups[0]["lr"] for o in opt.optimizers] == [0.0] * 3
    opt.step()
    sched.step()
    assert [o.param_groups[0]["lr"] for o in opt.optimizers] == [0.5] * 3
    state = opt.state_dict()
    assert len(state["optimizers"]) == 3
    opt.load_state_dict(state)


def test_fp16_loss_scale_is_undone_and_overflow_handled():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(4))
    ref = torch.nn.Parameter(torch.ones(4))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = InBackwardOptimizer([w], lambda ps: torch.optim.SGD(ps, lr=0.1), scaler=scaler)
    ref_opt = torch.optim.SGD([ref], lr=0.1)
    x = torch.arange(4.0)
    scaler.scale((w * x).sum()).backward()
    opt.step()
    (ref * x).sum().backward()
    ref_opt.step()
    assert torch.allclose(w, ref)  # the 1024x scale was undone before the update
    assert scaler.get_scale() == 1024.0 and opt.skipped == 0
    scaler.scale((w * torch.tensor([float("inf"), 1.0, 1.0, 1.0])).sum()).backward()
    before = w.detach().clone()
    opt.step()
    assert opt.skipped == 1 and scaler.get_scale() == 512.0  # backed off, as GradScaler does
    assert torch.isfinite(w).all() and torch.equal(w, before)  # the overflowed gradient was zeroed


def test_fallbacks_are_explained(cfg, capsys):
    ok, why = in_backward_active(cfg.replace(optimizer_in_backward=True))
    assert not ok and "max_grad_norm=1.0" in why
    ok, why = in_backward_active(cfg.replace(optimizer_in_backward=True, max_grad_norm=0.0,
                                             gradient_accumulation_steps=2))
    assert not ok and "gradient_accumulation_steps=2" in why
    ok, why = in_backward_active(cfg.replace(optimizer_in_backward=True, max_grad_norm=0.0), num_processes=2)
    assert not ok and "2 processes" in why
    assert in_backward_active(cfg.replace(optimizer_in_backward=True, max_grad_norm=0.0)) == (True, "")
    r = train(cfg.replace(optimizer_in_backward=True, max_train_steps=1), load_parts("offline"), progress=False)
    assert not r.info["optimizer_in_backward"]
    assert "using the normal optimizer instead" in capsys.readouterr().out


def test_make_optimizer_on_cpu_is_torch_adamw(cfg, capsys):
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(p, cfg.replace(use_8bit_adam=True), "cpu")
    assert isinstance(opt, torch.optim.AdamW) and "needs a CUDA GPU" in capsys.readouterr().out
    assert isinstance(make_optimizer(p, cfg, "cpu", in_backward=True), InBackwardOptimizer)


def _net_and_reference(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    ref.load_state_dict(model.state_dict())
    return model, ref


def test_a_second_optimizer_for_the_same_parameters_takes_them_over(capsys):
    """The first optimizer's hooks on these parameters go (said so): each parameter is updated once per backward."""
    model, ref = _net_and_reference()
    make = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    first = InBackwardOptimizer(model.parameters(), make)
    assert capsys.readouterr().out == ""
    second = InBackwardOptimizer(model.parameters(), make)
    said = capsys.readouterr().out
    assert "4 of these parameters were still hooked" in said and ".close()" in said
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    model(x).pow(2).sum().backward()
    second.step()
    ref(x).pow(2).sum().backward()
    ref_opt.step()
    assert first.steps_in_backward == 0 and second.steps_in_backward == 4
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)  # one SGD step, not two
    first.remove_hooks()  # it has none left on these parameters: nothing changes
    model(x).pow(2).sum().backward()
    assert second.steps_in_backward == 8 and all(p.grad is None for p in model.parameters())


def test_taking_over_some_parameters_leaves_the_old_optimizer_the_rest(capsys):
    model, _ = _net_and_reference()
    params = list(model.parameters())
    make = lambda ps: torch.optim.SGD(ps, lr=0.1)  # noqa: E731
    first = InBackwardOptimizer(params, make)
    second = InBackwardOptimizer(params[:2], make)  # the first layer only
    assert "2 of these parameters" in capsys.readouterr().out
    model(torch.randn(3, 4)).pow(2).sum().backward()
    assert (first.steps_in_backward, second.steps_in_backward) == (2, 2)
    second.close()
    third = InBackwardOptimizer(params[:2], make)  # closed ones hold nothing: no note
    assert capsys.readouterr().out == ""
    model(torch.randn(3, 4)).pow(2).sum().backward()
    assert (first.steps_in_backward, second.steps_in_backward, third.steps_in_backward) == (4, 2, 2)


def test_close_removes_the_hooks_and_frees_the_state_idempotently():
    model, _ = _net_and_reference()
    opt = InBackwardOptimizer(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    model(torch.randn(3, 4)).pow(2).sum().backward()
    assert all(len(o.state) == 1 for o in opt.optimizers)  # AdamW's moments, one parameter each
    opt.close()
    opt.close()  # again, as a `finally` after an earlier close may
    opt.remove_hooks()
    assert all(len(o.state) == 0 for o in opt.optimizers)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 4)).pow(2).sum().backward()
    assert opt.steps_in_backward == 4 and all(p.grad is not None for p in model.parameters())  # no hook stepped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="was closed"):
        opt.state_dict()
    keep = InBackwardOptimizer(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    model.zero_grad(set_to_none=True)
    model(torch.randn(3, 4)).pow(2).sum().backward()
    keep.close(drop_state=False)  # hooks off, state kept: it can still be saved
    assert len(keep.state_dict()["optimizers"]) == 4 and keep.optimizers[0].state
