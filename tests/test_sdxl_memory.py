"""SDXL in the memory planner and the presets: parameter counts from data/sdxl-arch (no download), LoRA on a T4
at 1024 px, full DreamBooth refused on 16 GB with the way out, and bench_memory's SDXL rows in planned mode."""

import dataclasses
import json

import pytest

from nbkit import TrainConfig
from nbkit.env.runtime import GPUS
from nbkit.memory import phases, planner, sdxlarch, tuning
from nbkit.training import presets

GiB = 2**30
SDXL = TrainConfig(model="sdxl", method="lora", resolution=1024, mixed_precision="fp16", use_8bit_adam=True,
                   gradient_checkpointing=True, cache_latents=True, validation_steps=0)


def xl(**changes):
    return dataclasses.replace(SDXL, **changes)  # no path checks: planning needs no pictures


def row(plan, prefix):
    return next(b for what, b in plan.rows if what.startswith(prefix))


def test_sdxl_is_counted_from_its_configs_on_the_meta_device():
    """SDXL base 1.0's published weights hold 2,567,463,684 (UNet), 83,653,863 (VAE: SD 1.5's layout), 123,060,480
    (CLIP ViT-L/14 text, as SD 1.5's) and 694,659,840 (OpenCLIP bigG text + its 1280x1280 projection) parameters:
    the configs in data/sdxl-arch, built on the meta device, must give exactly those."""
    arch = planner.arch_of("stabilityai/stable-diffusion-xl-base-1.0")  # no download: SDXL ids map to the spec
    assert arch is planner.arch_of("sdxl") and arch.sdxl and arch.name == "sdxl"
    assert {k: arch.params(k) for k in sdxlarch.PARAMS} == sdxlarch.PARAMS
    assert abs(arch.unet / 1e9 - 2.567) < 5e-4 and abs(arch.vae / 1e6 - 83.65) < 0.01
    assert abs(arch.text_encoder / 1e6 - 123.06) < 0.01 and abs(arch.text_encoder_2 / 1e6 - 694.66) < 0.01
    assert arch.lora_per_rank_unet * 4 == 5_806_080  # rank-4 LoRA on SDXL's attention: the usual ~23 MB fp32 file
    assert arch.vae_factor == 8 and arch.vae_fp32 and arch.cross_attention_dim == 2048 and arch.pooled_dim == 1280
    assert arch.calibration_source.startswith("calibrated") and arch.calibration["reference_latent"] == 128
    from nbkit.memory.budget import count_params, sdxl_on_meta

    assert {k: count_params(m) for k, m in sdxl_on_meta().items()} == sdxlarch.PARAMS  # the budget's view, the same
    nets = sdxlarch.build("meta")  # transformer_layers_per_block [1, 2, 10]: a list, one depth per level
    depths = [len(a.transformer_blocks) for b in nets.unet.down_blocks for a in getattr(b, "attentions", [])]
    assert depths == [2, 2, 10, 10] and not hasattr(nets.unet.down_blocks[0], "attentions")


def test_a_local_sdxl_folder_is_planned_from_its_own_configs(tmp_path):
    import shutil

    folder = shutil.copytree(sdxlarch.SPEC, tmp_path / "my-model")  # configs only, as a fine-tune's folder has them
    arch = planner.arch_of(str(folder))
    assert arch.sdxl and arch.unet == sdxlarch.PARAMS["unet"] and arch.calibration_source.startswith("calibrated")
    te = planner.plan(xl(method="lora", lora_text_encoder=True), str(folder), gpu_gb=14.75)
    assert row(te, "text encoder 2 (OpenCLIP bigG) weights (fp16, frozen + fp32 LoRA)") > 2 * arch.text_encoder_2
    assert any("UNet's activations only" in n for n in te.notes)  # SDXL's calibration: text encoders frozen


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_sdxl_lora_on_a_t4_plans_under_14_gib(rank):
    p = planner.plan(xl(lora_rank=rank), gpu_gb=GPUS["T4"].gpu_memory_gb)
    assert p.fits and p.peak <= 14 * GiB and p.settings["architecture"] == "sdxl"
    lora = sdxlarch.PARAMS["unet"] * 2 + planner.arch_of("sdxl").lora_per_rank_unet * rank * 4
    assert row(p, "UNet weights (fp16, frozen + fp32 LoRA)") == lora
    assert row(p, "text encoder 2 (OpenCLIP bigG) weights (fp16, frozen)") == 2 * sdxlarch.PARAMS["text_encoder_2"]
    assert row(p, "optimizer state (8-bit AdamW)") < 0.1 * GiB and row(p, "this step's cached latents") < 2**21
    caching = dict(p.phases)
    assert any(what.startswith("caching the latents") and "fp32" in what for what in caching)
    assert any("text encoders stay on the GPU" in n for n in p.notes) and not any("rough" in n for n in p.notes)
    free = planner.plan(xl(lora_rank=rank, gradient_checkpointing=False), gpu_gb=GPUS["T4"].gpu_memory_gb)
    assert row(free, "activations") > 4 * row(p, "activations")  # 1024 px without checkpointing: GiBs more


def test_sdxl_phases_caching_and_validation():
    p = planner.plan(xl(), gpu_gb=14.75)
    (what, caching), = p.phases
    weights = sum(b for w, b in p.rows if "weights" in w)
    vae = 4 * sdxlarch.PARAMS["vae"]  # fp32 (force_upcast)
    assert caching > weights + vae + GiB  # one 1024 px picture at a time through the fp32 VAE: still GiBs
    assert phases.encode_chunk(1024 ** 2, True) == 1 and phases.encode_chunk(512 ** 2, False) == 8
    assert p.peak == max(p.allocated, caching) and p.reserved >= p.peak
    fixed = planner.plan(xl(), gpu_gb=14.75)
    assert fixed.peak == p.peak  # planning is deterministic (the meta build is cached)
    val = planner.plan(xl(validation_steps=50, validation_prompts=["a photo of a dog"], num_validation_images=2),
                       gpu_gb=14.75)
    assert any(w.startswith("validation samples") for w, _ in val.phases) and "validation" in val.table()
    sd = planner.plan(TrainConfig(model="sd15", method="lora", mixed_precision="fp16"), gpu_gb=14.75)
    assert any("fp16/bf16" in w for w, _ in sd.phases)  # SD 1.5's VAE caches in the run's half precision


def test_sdxl_presets_pick_lora_savers_on_a_t4():
    tuned = tuning.tune(xl(use_8bit_adam=False, gradient_checkpointing=False), "auto", GPUS["T4"])
    c = tuned.config
    assert tuned.preset == "16gb" and tuned.plan.fits and tuned.plan.peak <= 14 * GiB
    assert (c.mixed_precision, c.use_8bit_adam, c.gradient_checkpointing, c.cache_latents) == ("fp16", True, True, True)
    ms = presets.memory_settings(GPUS["T4"], method="lora", sdxl=True)
    assert ms == {"mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True}
    shown = tuning.preview(TrainConfig(method="lora"), "T4", model="sdxl")  # what the notebook shows before training
    assert shown.config.resolution == 1024 and shown.plan.fits and shown.plan.settings["architecture"] == "sdxl"


def test_sdxl_dreambooth_on_16gb_is_refused_and_says_which_preset():
    db = xl(method="dreambooth")
    for gpu in ("T4", "P100", "RTX3060-12GB"):
        with pytest.raises(ValueError, match=r"method='lora'.*24 GB or more with PRESET='24gb'"):
            tuning.tune(db, "auto", GPUS[gpu])
    with pytest.raises(ValueError, match="Full DreamBooth of SDXL"):
        presets.memory_settings(GPUS["T4"], sdxl=True)
    t4 = planner.plan(db, gpu_gb=14.75)  # why: the trained UNet alone is ~24 GiB
    assert not t4.fits and t4.allocated > 24 * GiB
    l4 = tuning.tune(db, "auto", GPUS["L4"])  # 22 GiB: the 24gb preset trains it, the gradients one at a time
    assert l4.preset == "24gb" and l4.config.optimizer_in_backward and l4.config.use_8bit_adam and l4.plan.fits
    a100 = tuning.tune(db, "auto", GPUS["A100-40GB"])
    assert a100.preset == "40gb" and a100.plan.fits and a100.config.use_8bit_adam
    with pytest.raises(ValueError, match="not supported"):
        planner.plan(xl(method="textual_inversion", instance_prompt="a photo of <zwx>"))


def test_bench_memory_sdxl_rows_print_planned_figures(tmp_path, capsys):
    from benchmarks import bench_memory

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the SDXL rows are measured (minutes)")
    result = bench_memory.main(["--sdxl", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert [r["rank"] for r in result["rows"]] == [4, 8, 16] and all(r["measured"] is None for r in result["rows"])
    assert out.count("planned, not measured") >= 3 and "(planned: met)" in out and "<= 14.0" in out
    saved = json.loads(next(tmp_path.glob("sdxl-planned-*.json")).read_text())
    assert saved["measured"] is False and all(r["planner_peak_gib"] <= 14 for r in saved["rows"])
    assert saved["rows"][0]["planner_peak_gib"] < saved["rows"][2]["planner_peak_gib"]  # rank 4 < rank 16
