import pytest
import torch

from nbkit.memory import budget as memory
from nbkit.memory.budget import GiB, adam_state_bytes, budget, compare_settings, count_params, track_peak


def _state_bytes(opt) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step" and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def _model():
    return torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 10))  # 2 big, 2 small tensors


def _step(opt, m):
    m(torch.randn(2, 300)).sum().backward()
    opt.step()


def test_adam_state_count_matches_torch_adamw():
    m = _model()
    opt = torch.optim.AdamW(m.parameters())
    _step(opt, m)
    assert adam_state_bytes([p.numel() for p in m.parameters()]) == _state_bytes(opt)


def test_8bit_adam_state_count_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    m = _model()
    try:
        opt = bnb.optim.AdamW8bit(m.parameters())
        _step(opt, m)
    except Exception as err:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes cannot step here: {err}")
    shared_qmaps = 2 * 256 * 4  # the two quantization maps, shared by every tensor of the optimizer
    assert adam_state_bytes([p.numel() for p in m.parameters()], eight_bit=True) == _state_bytes(opt) - shared_qmaps


def test_budget_counts_what_trains(parts):
    u, te, vae = (count_params(m) for m in (parts.unet, parts.text_encoder, parts.vae))
    b = budget(parts, ("unet",))
    assert b.trainable_params == u and b.frozen_params == te  # the VAE left the GPU (cached latents)
    assert b.weights_bytes == 4 * (u + te) and b.grads_bytes == 4 * u and b.optimizer_bytes == 8 * u
    both = budget(parts, ("unet", "text_encoder"))
    assert both.total_bytes - b.total_bytes == 16 * te - 4 * te  # TE: +weights' grads and Adam, was frozen fp32
    half = budget(parts, ("unet",), mixed_precision="fp16", vae_on_gpu=True)
    assert half.weights_bytes == 4 * u + 2 * (te + vae)  # trainable stay fp32, frozen ones fp16
    with pytest.raises(ValueError, match="cannot train"):
        budget(parts, ("lora",))


def test_sd15_counts_and_the_16gb_story():
    mods = memory.sd15_on_meta()
    assert {k: count_params(m) for k, m in mods.items()} == {
        "unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    ladder = {b.label: b.total_bytes / GiB for b in compare_settings(mods)}
    full = ladder["UNet + text encoder, fp32, AdamW"]
    preset = ladder["UNet + text encoder, fp16 mixed, 8-bit AdamW"]
    assert full > 14.5  # a T4's 15 GiB is gone before the first activation
    assert preset < 9.5  # leaves ~5 GiB for activations (with gradient checkpointing)
    assert ladder["UNet, fp32, AdamW"] < full and ladder["UNet, fp16 mixed, 8-bit AdamW"] < preset
    assert "total GiB" in memory.budget_table(compare_settings(mods))


def test_track_peak():
    with track_peak("x") as t:
        torch.ones(10)
    if torch.cuda.is_available():
        assert t.bytes and t.bytes > 0 and "GiB" in t.describe()
    else:
        assert t.bytes is None and "not measured" in t.describe()
