"""nbkit.export.formats: every format reloads through diffusers and gives what the in-memory model gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _images import assert_same_picture, draw
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from nbkit import TrainConfig, generate, load_parts, pipeline, safeio, train
from nbkit.export import formats as export
from nbkit.export.takehome import pixel_difference
from nbkit.models.offline import SAMPLE_INSTANCE_DIR

PROMPT = "a photo of <zwx> on a green background"


def base_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(load_parts("offline").source)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def outputs(parts_or_pipe, prompt="a star"):
    """Text-encoder and UNet outputs on fixed inputs: a sharper check than images."""
    tok, te, unet = parts_or_pipe.tokenizer, parts_or_pipe.text_encoder, parts_or_pipe.unet
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = te(ids)[0]
        return emb, unet(x, torch.tensor([500]), emb).sample


def make_cfg(tmp, **kw):
    base = dict(instance_dir=str(SAMPLE_INSTANCE_DIR), output_dir=str(tmp), resolution=64, max_train_steps=2,
                learning_rate=5e-2, validation_steps=0, sample_steps=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, offline_dir):
    """LoRA on UNet and text encoder with alpha != rank: a wrong alpha anywhere shows up as a different output."""
    parts = load_parts("offline")
    before = {"unet": export.snapshot(parts.unet), "text_encoder": export.snapshot(parts.text_encoder)}
    r = train(make_cfg(tmp_path_factory.mktemp("lora"), method="lora", lora_rank=4, lora_alpha=8,
                       lora_text_encoder=True), parts, progress=False)
    r.info["before"] = before  # for the test that only adapters moved
    return r


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory, offline_dir):
    return train(make_cfg(tmp_path_factory.mktemp("ti"), method="textual_inversion", instance_prompt="a photo of <zwx>",
                          num_vectors=2), progress=False)


@pytest.fixture(scope="module")
def ti_image(ti_run):
    return generate(pipeline(ti_run.parts), PROMPT, seeds=[1], steps=2)[0]


# ------------------------------------------------------------------------------------------------- diffusers folder


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_diffusers_folder_honours_dtype_and_reloads(tmp_path, parts, dtype, monkeypatch):
    weights = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    merged = []
    real = safeio._stream_cast
    monkeypatch.setattr(safeio, "_stream_cast", lambda src, *a: merged.append(len(src)) or real(src, *a))
    monkeypatch.setattr(export, "SHARD", "1MB")  # the 6.8 MB UNet is written in shards, then streamed into one file
    out = export.diffusers_folder(parts, tmp_path / "model", dtype=dtype)
    assert max(merged) >= 5
    want = torch.float16 if dtype == "fp16" else torch.float32
    for sub in ("unet", "vae", "text_encoder"):
        files = sorted(p.name for p in (out / sub).iterdir() if "safetensors" in p.name)
        assert len(files) == 1 and not files[0].startswith("."), files  # one file per part, no index, no leftovers
        sd = load_file(out / sub / files[0])
        assert {v.dtype for v in sd.values() if v.is_floating_point()} == {want}, sub
    # the in-memory model is untouched: same precision, same values (no fp16 round trip)
    assert all(torch.equal(v, weights[k]) for k, v in parts.unet.state_dict().items())
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    for name in ("unet", "text_encoder", "vae"):
        mine, theirs = getattr(parts, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(mine[k].to(want).float(), theirs[k]) for k in mine), name
    pipe.set_progress_bar_config(disable=True)
    tolerance = dict(mean=1e-3, largest=1) if dtype == "fp32" else dict(mean=1.0)  # fp16: weight rounding only
    assert_same_picture(pipeline(parts), pipe, prompt="a star", seed=3, **tolerance)
    assert not any(p.suffix in (".bin", ".pt", ".ckpt") for p in out.rglob("*"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures RssAnon in /proc (Linux)")
@pytest.mark.parametrize("mode", ["diffusers", "single_file"])
def test_fp16_export_needs_no_second_copy_of_the_model(tmp_path, offline_dir, mode):
    """The fp16 export of a ~170 MB model (in a fresh process) adds far less host memory than a copy of it: the
    file is streamed tensor by tensor (the old export held the fp32 file read back, its fp16 copy and the bytes)."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(root / "tests" / "_export_memory_worker.py"), mode, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["model_bytes"] > 150e6  # big enough that a copy of it stands out of the noise
    assert got["extra_bytes"] < 0.1 * got["model_bytes"], got  # a fp16 copy alone would be 0.5, the old way ~1-2


def test_diffusers_folder_refuses_unmerged_lora(lora_run, tmp_path):
    with pytest.raises(export.ExportError, match="fuse_lora"):
        export.diffusers_folder(lora_run, tmp_path / "m")


def test_fused_lora_saves_as_a_whole_model(lora_run, tmp_path):
    pipe = base_pipe()
    pipe.load_lora_weights(str(lora_run.saved))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the adapters go, their effect stays in the fused weights
    out = export.diffusers_folder(pipe, tmp_path / "merged")
    merged = StableDiffusionPipeline.from_pretrained(out)
    for mine, theirs in zip(outputs(lora_run.parts), outputs(merged)):
        assert torch.allclose(mine, theirs, atol=1e-4)


def test_bad_dtype_is_explained(parts, tmp_path):
    with pytest.raises(export.ExportError, match="fp32.*fp16"):
        export.diffusers_folder(parts, tmp_path / "m", dtype="bf8")


# ---------------------------------------------------------------------------------------------------------- LoRA


def test_lora_changes_only_adapter_weights(lora_run):
    for name in ("unet", "text_encoder"):
        module = getattr(lora_run.parts, name)
        assert export.max_weight_diff(module, lora_run.info["before"][name]) == 0, name  # base weights untouched
        ups = [v for k, v in module.state_dict().items() if "lora_B" in k]
        assert ups and all(v.abs().sum() > 0 for v in ups), name  # every adapter learned (lora_B starts at zero)
    trained = {id(p) for p in lora_run.method.params}
    for module in (lora_run.parts.unet, lora_run.parts.text_encoder):
        assert all(("lora_" in n) == (id(p) in trained) for n, p in module.named_parameters())


def assert_lora_file_matches(lora_run, path, atol=1e-5):
    """The file on a fresh base model gives the trained model's outputs and its picture for the same seed."""
    pipe = base_pipe()
    pipe.load_lora_weights(str(path))
    for mine, theirs in zip(outputs(lora_run.parts), outputs(pipe)):
        assert torch.allclose(mine, theirs, atol=atol)
    tolerance = dict(mean=0.05, largest=1) if atol < 1e-4 else dict(mean=1.0)  # fp16 files: rounding only
    assert_same_picture(lora_run.pipeline(), pipe, prompt="a star", seed=2, **tolerance)


def test_lora_diffusers_keeps_alpha_and_reloads_exactly(lora_run, tmp_path):
    path = export.lora_diffusers(lora_run, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    assert export.lora_rank_alpha(path) == {"unet": (4, 8.0), "text_encoder": (4, 8.0)}
    sd = load_file(path)
    assert any(k.startswith("text_encoder.text_model.") for k in sd)  # the layout every tool expects
    assert_lora_file_matches(lora_run, path)


def test_lora_kohya_keys_alpha_and_reload_through_diffusers(lora_run, tmp_path):
    path = export.lora_kohya(lora_run, tmp_path / "subject.safetensors", dtype="fp32")
    sd = load_file(path)
    unet_keys = [k for k in sd if k.startswith("lora_unet_")]
    te_keys = [k for k in sd if k.startswith("lora_te_text_model_encoder_layers_")]
    assert unet_keys and te_keys and len(unet_keys) + len(te_keys) == len(sd)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in sd
    downs = [k for k in sd if k.endswith(".lora_down.weight")]
    assert (len(downs) == len([k for k in sd if k.endswith(".lora_up.weight")])
            == len([k for k in sd if k.endswith(".alpha")]))
    # the trained alpha, not the rank
    assert all(sd[k.replace(".lora_down.weight", ".alpha")].item() == 8.0 for k in downs)
    assert all(sd[k].shape[0] == 4 for k in downs)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert_lora_file_matches(lora_run, path)


def test_lora_kohya_fp16_is_half_and_close(lora_run, tmp_path):
    p16 = export.lora_kohya(lora_run, tmp_path)  # a folder: default name, fp16
    p32 = export.lora_kohya(lora_run, tmp_path / "f32.safetensors", dtype="fp32")
    assert p16.name == "lora_kohya.safetensors"
    assert {v.dtype for k, v in load_file(p16).items() if not k.endswith(".alpha")} == {torch.float16}
    nbytes = lambda p: sum(v.numel() * v.element_size() for v in load_file(p).values())  # noqa: E731
    assert nbytes(p16) < 0.55 * nbytes(p32)
    assert_lora_file_matches(lora_run, p16, atol=1e-2)  # fp16 rounding of the adapters only


def test_lora_scale_fuse_and_unfuse(lora_run):
    pipe = base_pipe()
    base_unet, base_te = export.snapshot(pipe.unet), export.snapshot(pipe.text_encoder)
    plain = outputs(pipe)
    pipe.load_lora_weights(str(lora_run.saved), adapter_name="subject")
    at = {}
    for s in (0.0, 0.5, 1.0):
        pipe.set_adapters("subject", s)
        at[s] = outputs(pipe)
    assert all(torch.equal(a, b) for a, b in zip(at[0.0], plain))  # scale 0: the base model
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(at[1.0], outputs(lora_run.parts)))  # scale 1: as trained
    gap = lambda x, y: (x[1] - y[1]).abs().max().item()  # noqa: E731
    assert gap(at[0.5], plain) > 1e-4 and gap(at[0.5], at[1.0]) > 1e-4  # half strength: in between
    pipe.fuse_lora(lora_scale=1.0)
    assert export.max_weight_diff(pipe.unet, base_unet) > 1e-4  # the LoRA is now inside the base weights
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs(pipe), at[1.0]))
    pipe.unfuse_lora()
    assert export.max_weight_diff(pipe.unet, base_unet) < 1e-5  # W + BA - BA: float rounding only
    assert export.max_weight_diff(pipe.text_encoder, base_te) < 1e-5
    pipe.unload_lora_weights()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs(pipe), plain))


def test_lora_export_needs_adapters(parts, tmp_path):
    with pytest.raises(export.ExportError, match="method='lora'"):
        export.lora_kohya(parts, tmp_path)


# ------------------------------------------------------------------------------------------ textual inversion


@pytest.mark.parametrize("fmt", ["diffusers", "a1111", "a1111_pt"])
def test_ti_exports_reload_with_load_textual_inversion(ti_run, ti_image, tmp_path, fmt):
    vec = export.embedding(ti_run, "<zwx>")
    assert vec.shape == (2, ti_run.parts.text_encoder.get_input_embeddings().weight.shape[1])
    if fmt == "diffusers":
        path = export.ti_diffusers(ti_run, "<zwx>", tmp_path)
        assert path.name == "learned_embeds.safetensors" and list(load_file(path)) == ["<zwx>"]
    elif fmt == "a1111":
        path = export.ti_a1111(ti_run, "<zwx>", tmp_path)
        assert path.name == "zwx.safetensors" and list(load_file(path)) == ["emb_params"]  # A1111 prompts it as 'zwx'
    else:
        with pytest.raises(ValueError, match="safetensors only"):
            export.ti_a1111(ti_run, "<zwx>", tmp_path / "zwx.pt")
        path = tmp_path / "zwx.pt"  # an old-style A1111 embedding someone gives us: read, never written by the kit
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "zwx", "step": 2}, path)
    assert export.size_mb(path) < 0.01
    assert torch.equal(export.read_embedding(path)[1], vec)
    pipe = base_pipe()
    pipe.load_textual_inversion(str(path), token="<zwx>")
    assert torch.equal(export.embedding(pipe, "<zwx>"), vec)
    assert pixel_difference(ti_image, draw(pipe, PROMPT, seed=1))[1] <= 1


def test_the_method_writes_the_diffusers_format(ti_run):
    assert ti_run.saved.name == "learned_embeds.safetensors"
    assert torch.equal(load_file(ti_run.saved)["<zwx>"], export.embedding(ti_run, "<zwx>"))


def test_load_embedding_then_dreambooth_from_it(ti_run, tmp_path):
    """The TI -> DreamBooth route: the embedding goes into fresh parts, DreamBooth trains the UNet with it."""
    parts = load_parts("offline")
    tokens = export.load_embedding(parts, ti_run.saved, "<zwx>")
    assert tokens == ["<zwx>", "<zwx>_1"]
    vec = export.embedding(ti_run, "<zwx>")
    assert torch.equal(export.embedding(parts, "<zwx>"), vec)
    prompt = export.expand_prompt("a photo of <zwx>", parts.tokenizer, "<zwx>")
    assert prompt == "a photo of <zwx> <zwx>_1"
    unet0 = export.snapshot(parts.unet)
    r = train(make_cfg(tmp_path, method="dreambooth", identifier="<zwx>", instance_prompt=prompt, learning_rate=1e-3),
              parts, progress=False)
    assert export.max_weight_diff(r.parts.unet, unet0) > 0
    assert torch.equal(export.embedding(r, "<zwx>"), vec)  # the text encoder stayed frozen
    reloaded = StableDiffusionPipeline.from_pretrained(r.saved)  # the saved model knows the token
    assert torch.equal(export.embedding(reloaded, "<zwx>"), vec)


def test_ti_errors_say_what_to_do(ti_run, parts, tmp_path):
    with pytest.raises(export.ExportError, match="no token '<abc>'"):
        export.ti_diffusers(ti_run, "<abc>", tmp_path)
    bad = tmp_path / "two.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, str(bad))
    with pytest.raises(export.ExportError, match="holds 2 tensors"):
        export.read_embedding(bad)
    anon = tmp_path / "anon.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(anon))
    with pytest.raises(export.ExportError, match="token="):
        export.load_embedding(parts, anon)


# ------------------------------------------------------------------------------ take it home (nbkit.export.takehome)


def test_take_home_dreambooth_writes_fp16_folder_and_single_file(parts, tmp_path, capsys):
    from nbkit.export import takehome

    got = takehome.take_home(parts, tmp_path / "export", method="dreambooth", name="zwx", prompt=PROMPT, steps=2,
                             size=64)
    assert list(got) == ["diffusers", "single_file"]
    assert ((tmp_path / "export" / "model_index.json").exists()
            and got["single_file"].path.name == "zwx_dreambooth.safetensors")
    assert {v.dtype for v in load_file(tmp_path / "export" / "unet"
                                       / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    assert all(e.ok and e.mean_pixel_diff <= 1.0 for e in got.values()), got  # reloaded: fp16 rounding only
    text = takehome.report(got)
    assert text.count("same picture") == 2 and "export/" in text and "AUTOMATIC1111" in text
    assert got["diffusers"].size.endswith("MB") and parts.unet.dtype == torch.float32  # the model in memory kept fp32


def test_take_home_lora_and_ti_reload_onto_the_base_model(lora_run, ti_run, ti_image, tmp_path):
    from nbkit.export import takehome

    lora = takehome.take_home(lora_run, tmp_path / "lora", prompt="a star", seed=2, steps=2, size=64, dtype="fp32",
                              reference=draw(lora_run.pipeline(), "a star", seed=2))
    assert [e.path.name for e in lora.values()] == ["pytorch_lora_weights.safetensors", "zwx_lora.safetensors"]
    assert all(export.lora_rank_alpha(e.path) == {"unet": (4, 8.0), "text_encoder": (4, 8.0)} for e in lora.values())
    assert all(e.ok and e.max_pixel_diff <= 1 for e in lora.values()), lora
    ti = takehome.take_home(ti_run, tmp_path / "ti", prompt=PROMPT, seed=1, steps=2, reference=ti_image)
    assert [e.path.name for e in ti.values()] == ["learned_embeds.safetensors", "zwx.safetensors"]
    assert all(e.max_pixel_diff <= 1 and e.note == "the same vectors" for e in ti.values()), ti


def test_take_home_reloads_in_fp16_as_on_a_gpu(ti_run, ti_image, parts, tmp_path, monkeypatch):
    """On a GPU every file is reloaded in fp16 (simulated here on the CPU): the embedding comes back rounded to
    fp16 and the pictures differ by rounding; both count as the same model."""
    from nbkit.export import takehome

    monkeypatch.setattr(takehome, "_reload_dtype", lambda: torch.float16)
    vec = export.embedding(ti_run, "<zwx>")
    assert not torch.equal(vec.half().float(), vec)  # fp16 really rounds these vectors: the check has teeth
    ti = takehome.take_home(ti_run, tmp_path / "ti", prompt=PROMPT, seed=1, steps=2, reference=ti_image)
    assert all(e.ok and e.note == "the same vectors (up to float16 rounding)" for e in ti.values()), ti
    db = takehome.take_home(parts, tmp_path / "db", method="dreambooth", name="zwx", prompt=PROMPT, steps=2, size=64)
    assert all(e.ok for e in db.values()), db


def test_vectors_note_allows_the_reload_precision_only():
    from nbkit.export.takehome import vectors_note

    torch.manual_seed(0)
    vec = torch.randn(2, 32) * 0.02
    assert vectors_note(vec.clone(), vec, torch.float32) == "the same vectors"
    assert vectors_note(vec.half(), vec, torch.float16) == "the same vectors (up to float16 rounding)"
    assert vectors_note(vec.bfloat16(), vec, torch.bfloat16) == "the same vectors (up to bfloat16 rounding)"
    assert vectors_note(vec.bfloat16(), vec, torch.float16).startswith("the vectors DIFFER")  # more than fp16 rounds
    assert vectors_note(vec.half().float(), vec, torch.float32).startswith("the vectors DIFFER")  # fp32: exact
    moved = vec.clone()
    moved[1, 3] += 1e-3
    assert vectors_note(moved.half(), vec, torch.float16) == "the vectors DIFFER (largest difference 0.001)"
    assert "shape (1, 32)" in vectors_note(vec[:1], vec, torch.float32)


def test_take_home_says_what_is_wrong(parts, tmp_path, monkeypatch):
    from nbkit.export import takehome

    with pytest.raises(ValueError, match="unknown format.*single_file"):
        takehome.take_home(parts, tmp_path, ["ckpt"])
    with pytest.raises(ValueError, match="token="):
        takehome.take_home(parts, tmp_path, ["ti_diffusers"], check=False)
    monkeypatch.setattr(takehome.shutil, "disk_usage", lambda p: type("U", (), {"free": 10**6})())
    with pytest.raises(OSError, match="free some space"):
        takehome.take_home(parts, tmp_path, method="dreambooth")
    # the fp16 folder is first written in fp32, then cast part by part: twice the fp16 size is not enough
    n = sum(p.numel() for m in (parts.unet, parts.text_encoder, parts.vae) for p in m.parameters())
    monkeypatch.setattr(takehome.shutil, "disk_usage", lambda p: type("U", (), {"free": n * 2 * 2 * 1.1})())
    with pytest.raises(OSError, match="free some space"):
        takehome.take_home(parts, tmp_path, method="dreambooth")


def test_push_explains_when_it_cannot_upload_and_builds_the_card(ti_run, tmp_path, monkeypatch, capsys):
    from nbkit.export import hub, takehome

    got = takehome.take_home(ti_run, tmp_path / "ti", check=False)
    assert all(e.ok is None for e in got.values()) and "not reloaded" in takehome.report(got)
    assert takehome.push(got, "me/zwx") is None and "HF_HUB_OFFLINE" in capsys.readouterr().out  # offline here
    monkeypatch.setattr(hub, "is_offline", lambda: False)
    monkeypatch.setattr(hub, "token", lambda: None)
    assert takehome.push(got, "me/zwx") is None and "not logged in" in capsys.readouterr().out
    sent = {}
    monkeypatch.setattr(hub, "push_to_hub", lambda folder, repo, card, **kw: sent.update(folder=folder, card=card))
    takehome.push(got, "me/zwx", ti_run)
    card = sent["card"]("me/zwx")  # made only when uploading, for the full repo id
    assert sent["folder"] == tmp_path / "ti" and "load_textual_inversion" in card
    assert "`zwx.safetensors`" in card and "`learned_embeds.safetensors`" in card
