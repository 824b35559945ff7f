"""Presets chosen from the GPU (fake runtimes: T4, P100, 8/12/24 GB cards, A100, CPU) and tuned by the planner."""

import json

import pytest
import yaml

from nbkit import TrainConfig
from nbkit.env.runtime import Runtime
from nbkit.memory import tuning
from nbkit.training import presets

T4 = Runtime("colab", "cuda", "Tesla T4", 1, 14.75, False)
P100 = Runtime("kaggle", "cuda", "Tesla P100-PCIE-16GB", 1, 15.89, False)
KAGGLE_2xT4 = Runtime("kaggle", "cuda", "Tesla T4", 2, 14.75, False)
CARD_8GB = Runtime("local", "cuda", "GeForce RTX 3070", 1, 7.79, True)
CARD_8GB_FP16 = Runtime("local", "cuda", "GeForce RTX 2070", 1, 7.79, False)
CARD_12GB = Runtime("local", "cuda", "GeForce RTX 3060", 1, 11.76, True)
CARD_24GB = Runtime("local", "cuda", "GeForce RTX 3090", 1, 23.69, True)
A100 = Runtime("local", "cuda", "NVIDIA A100-SXM4-40GB", 1, 39.39, True)
CPU = Runtime("local", "cpu", None, 0, 0.0, False)

SD15_TE_PRIOR = TrainConfig(model="sd15", train_text_encoder=True, with_prior_preservation=True,
                            class_prompt="a photo of a dog", class_dir="class", instance_prompt="a photo of zwx dog")


@pytest.mark.parametrize("rt,name", [(T4, "16gb"), (P100, "16gb"), (KAGGLE_2xT4, "16gb"), (CARD_8GB, "8gb"),
                                     (CARD_12GB, "12gb"), (CARD_24GB, "24gb"), (A100, "40gb"), (CPU, "cpu")])
def test_preset_follows_gpu_memory(rt, name):
    assert presets.choose(rt) == name


def test_precision_follows_capability_and_trainable_weights_stay_fp32():
    assert presets.settings("16gb", T4)["mixed_precision"] == "fp16"  # T4, P100: no bf16
    assert presets.settings("16gb", P100)["mixed_precision"] == "fp16"
    assert presets.settings("40gb", A100)["mixed_precision"] == "bf16"
    assert presets.settings("8gb", CARD_8GB_FP16)["mixed_precision"] == "fp16"
    assert presets.settings("cpu", CPU)["mixed_precision"] == "no"
    for name in presets.NAMES:  # every preset keeps latents cached (VAE off the GPU)
        assert presets.settings(name, T4)["cache_latents"] is True


def test_what_each_preset_switches():
    te = TrainConfig(train_text_encoder=True)
    s8 = presets.settings("8gb", CARD_8GB, te)
    assert s8["use_8bit_adam"] and s8["gradient_checkpointing"] and s8["optimizer_in_backward"]
    assert s8["max_grad_norm"] == 0 and s8["gradient_accumulation_steps"] == 1  # the in-backward limits, coherent
    lora8 = presets.settings("8gb", CARD_8GB, TrainConfig(method="lora"))
    assert not lora8["optimizer_in_backward"] and "max_grad_norm" not in lora8
    s16 = presets.settings("16gb", T4, te)
    assert s16["use_8bit_adam"] and s16["gradient_checkpointing"] and not s16["optimizer_in_backward"]
    assert not presets.settings("16gb", T4, TrainConfig())["gradient_checkpointing"]  # UNet only, batch 1
    assert not presets.settings("40gb", A100, te)["use_8bit_adam"]
    ds = presets.settings("8gb-deepspeed", CARD_8GB)
    assert ds["deepspeed_config"] == str(presets.deepspeed_config_path()) and not ds["use_8bit_adam"]
    with pytest.raises(ValueError, match="PRESET='nope'"):
        presets.settings("nope", T4)


def test_memory_settings_come_from_the_presets_table():
    for rt in (T4, A100, CPU, CARD_8GB):
        s = presets.settings(presets.choose(rt), rt, TrainConfig(train_text_encoder=True))
        assert presets.memory_settings(rt, train_text_encoder=True) == {
            k: s[k] for k in ("mixed_precision", "use_8bit_adam", "gradient_checkpointing")}


def test_auto_on_a_t4_fits_dreambooth_with_text_encoder_and_prior():
    t = tuning.tune(SD15_TE_PRIOR, "auto", T4)
    assert t.preset == "16gb" and t.plan.fits and t.plan.capacity
    c = t.config
    assert c.mixed_precision == "fp16" and c.use_8bit_adam and c.gradient_checkpointing and c.cache_latents
    assert t.plan.needed < 11.5 * 2**30


def test_auto_on_t4s_keeps_checkpointing_only_where_the_plan_needs_it():
    """DreamBooth (UNet) + prior at 512 px: on one T4 it fits without checkpointing (planned ~13.7 of 14.75 GiB,
    the fp32 norms of CUDA autocast counted); on 2 x T4 DDP's buckets hold every gradient through the forward
    pass and it does not (~17 GiB), so checkpointing stays on. With the text encoder it stays on for both."""
    prior = TrainConfig(model="sd15", with_prior_preservation=True, class_prompt="a photo of a dog", class_dir="c",
                        instance_prompt="a photo of zwx dog")
    one = tuning.tune(prior, "auto", T4)
    assert not one.config.gradient_checkpointing and one.plan.fits and one.plan.headroom >= 0.05
    assert any("gradient checkpointing off" in c for c in one.changes)
    two = tuning.tune(prior, "auto", KAGGLE_2xT4, num_processes=2)
    assert two.config.gradient_checkpointing and two.plan.fits
    assert any(what.startswith("DDP buckets") for what, _ in two.plan.rows)
    assert not any(what.startswith("DDP buckets") for what, _ in one.plan.rows)
    for rt, n in ((T4, 1), (KAGGLE_2xT4, 2)):
        assert tuning.tune(SD15_TE_PRIOR, "auto", rt, num_processes=n).config.gradient_checkpointing


def test_auto_on_an_8gb_card_uses_the_optimizer_in_backward():
    t = tuning.tune(SD15_TE_PRIOR, "auto", CARD_8GB)
    assert t.preset == "8gb" and t.config.optimizer_in_backward and t.config.max_grad_norm == 0
    assert t.plan.allocated < 8 * 2**30  # the target: peak allocated under 8 GiB, no CPU offload
    assert any("one parameter at a time" in what for what, _ in t.plan.rows)
    if not t.plan.fits:  # the allocator's slack and the CUDA context are estimated conservatively
        assert any("resolution" in a for a in t.advice)


def test_auto_drops_checkpointing_when_it_fits_without_and_keeps_explicit_choices():
    unet_only = TrainConfig(model="sd15", gradient_checkpointing=True)
    t = tuning.tune(unet_only, "auto", A100)
    assert not t.config.gradient_checkpointing and t.plan.fits
    kept = tuning.tune(unet_only, "auto", A100, keep={"gradient_checkpointing"})
    assert kept.config.gradient_checkpointing


def test_auto_adds_memory_savers_until_it_fits():
    big = TrainConfig(model="sd15", train_text_encoder=True, train_batch_size=4)
    named = tuning.tune(big, "12gb", CARD_12GB)
    assert not named.plan.fits and named.advice and not named.changes
    t = tuning.tune(big, "auto", CARD_12GB)
    assert t.changes and t.plan.fits and t.plan.needed < named.plan.needed
    assert t.config.train_batch_size * t.config.gradient_accumulation_steps == 4 or t.config.optimizer_in_backward


def test_named_preset_is_not_changed_but_advice_says_what_to_change():
    t = tuning.tune(SD15_TE_PRIOR, "40gb", CARD_8GB)
    assert not t.plan.fits and not t.changes
    assert not t.config.use_8bit_adam  # as the preset says
    assert t.advice and any("use_8bit_adam=True" in a for a in t.advice)
    assert any("fits" in a for a in t.advice) or any("still too big" in a for a in t.advice)
    assert "DOES NOT FIT" in t.plan.table()


def test_deepspeed_preset_rejects_the_text_encoder_and_mentions_host_ram():
    with pytest.raises(ValueError, match="UNet only"):
        tuning.tune(SD15_TE_PRIOR, "8gb-deepspeed", CARD_8GB)
    t = tuning.tune(TrainConfig(model="sd15"), "8gb-deepspeed", CARD_8GB)
    assert t.config.deepspeed_config and any("25 GB of RAM" in a for a in t.advice)
    assert t.plan.allocated < 8 * 2**30


def test_deepspeed_and_accelerate_configs_parse_and_the_preset_points_at_them():
    from nbkit.training.accel import load_deepspeed_config

    ds = load_deepspeed_config(presets.deepspeed_config_path())
    z = ds["zero_optimization"]
    assert z["stage"] == 2 and z["offload_optimizer"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] == "auto" and ds["zero_force_ds_cpu_optimizer"] is False
    acc = yaml.safe_load(presets.accelerate_config_path().read_text())
    assert acc["distributed_type"] == "DEEPSPEED"
    assert (presets.CONFIGS_DIR.parent / acc["deepspeed_config"]["deepspeed_config_file"]).resolve() == \
        presets.deepspeed_config_path().resolve()
    multi = yaml.safe_load((presets.CONFIGS_DIR / "accelerate" / "multi_gpu.yaml").read_text())
    assert multi["distributed_type"] == "MULTI_GPU" and multi["num_processes"] == 2
    bad = presets.CONFIGS_DIR.parent / ".cache" / "bad_ds.json"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text(json.dumps({"zero_optimization": {}}))
    with pytest.raises(ValueError, match="stage must be"):
        load_deepspeed_config(bad)


def test_describe_lists_every_preset():
    text = tuning.describe()
    assert all(f"| {n} |" in text for n in presets.NAMES)


def test_sdpa_is_the_attention_everywhere(parts):
    backends = tuning.attention_backends(parts)
    assert backends == {"unet": "AttnProcessor2_0", "text_encoder": "sdpa"}


def test_preview_plans_sd15_on_a_named_gpu_from_a_cpu_session(cfg):
    t = tuning.preview(cfg, "T4")  # the offline notebook's config, as SD 1.5 at 512 px on a Colab T4
    assert t.preset == "16gb" and t.config.model == "sd15" and t.config.resolution == 512 and t.plan.fits
    assert t.config.instance_dir == cfg.instance_dir and t.plan.capacity == int(14.75 * 2**30)
    assert not any(what.startswith("DDP") for what, _ in t.plan.rows)
    kaggle = tuning.preview(cfg, "2xT4")  # one DDP process per T4
    assert kaggle.plan.settings["num_processes"] == 2 and any(w.startswith("DDP") for w, _ in kaggle.plan.rows)
    with pytest.raises(ValueError, match="gpu='H200'"):
        tuning.preview(cfg, "H200")
