from nbkit.env import runtime
from nbkit.env.runtime import Runtime
from nbkit.training import presets

T4 = Runtime("colab", "cuda", "Tesla T4", 1, 15.0, False)
A100 = Runtime("local", "cuda", "A100", 1, 40.0, True)
CPU = Runtime("local", "cpu", None, 0, 0.0, False)


def test_auto_model_without_gpu_is_offline_and_says_so():
    model, why = runtime.choose_model("auto", CPU)
    assert model == "offline" and "OFFLINE" in why
    assert runtime.choose_model("my/model", CPU)[0] == "my/model"


def test_auto_model_on_gpu_without_hub(monkeypatch):
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: False)
    model, why = runtime.choose_model("auto", T4)
    assert model == "offline" and "hub cannot be reached" in why
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: True)
    assert runtime.choose_model("auto", T4)[0] == runtime.SD15


def test_hub_offline_env_is_respected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert runtime.hub_reachable() is False


def test_one_precision_rule_for_runs_plans_and_presets():
    import warnings

    import pytest

    from nbkit.config import TrainConfig
    from nbkit.memory import planner
    from nbkit.training import presets

    want = {  # runtime -> what auto, no, fp16, bf16 become
        T4: ("fp16", "no", "fp16", "fp16"), A100: ("bf16", "no", "fp16", "bf16"),
        CPU: ("no", "no", "no", "bf16"),  # CPU autocast does bf16
        runtime.T4_REHEARSAL: ("fp16", "no", "fp16", "fp16"),
    }
    for rt, got in want.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert tuple(runtime.resolve_precision(p, rt) for p in ("auto", "no", "fp16", "bf16")) == got
        assert presets.settings("cpu", rt)["mixed_precision"] == got[0] == rt.default_precision()
        if not rt.rehearsal:  # the planner knows device and bf16 only
            assert planner.resolve_precision(TrainConfig(mixed_precision="bf16"), rt.device, rt.bf16) == got[3]
    with pytest.warns(UserWarning, match="no bf16"):
        runtime.resolve_precision("bf16", T4)
    with pytest.warns(UserWarning, match="needs a CUDA GPU"):
        runtime.resolve_precision("fp16", CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.resolve_precision("fp16", CPU, warn=False) == "no"


def test_precision_and_memory_settings_fit_the_gpu():
    assert T4.default_precision() == "fp16" and A100.default_precision() == "bf16" and CPU.default_precision() == "no"
    t4 = presets.memory_settings(T4, train_text_encoder=True)
    assert t4["use_8bit_adam"] and t4["gradient_checkpointing"]
    assert not presets.memory_settings(A100)["use_8bit_adam"]
    assert not presets.memory_settings(T4)["gradient_checkpointing"]
    assert presets.memory_settings(T4, with_prior_preservation=True)["gradient_checkpointing"]  # twice the images
    assert presets.memory_settings(CPU)["mixed_precision"] == "no"
    assert "fp16 only" in T4.describe() and "no GPU" in CPU.describe()


def test_detect_on_this_machine():
    rt = runtime.detect()
    assert rt.platform in ("local", "colab", "kaggle") and rt.device in ("cpu", "cuda", "mps")


def _fake_gpu(monkeypatch, name, major, minor, initialised=True, smi=None):
    """torch.cuda as a GPU machine would answer; is_bf16_supported() says yes as it does on a T4 once CUDA is up."""
    import subprocess
    from types import SimpleNamespace

    import torch

    monkeypatch.delenv(runtime.REHEARSAL_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name=name, major=major, minor=minor, total_memory=int(14.75 * 2**30)))

    def run(cmd, **kw):
        if smi is None:
            raise FileNotFoundError("nvidia-smi")
        return SimpleNamespace(stdout=smi + "\n")

    monkeypatch.setattr(subprocess, "run", run)


def test_a_t4_is_fp16_even_when_torch_says_bf16(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla T4", 7, 5)
    rt = runtime.detect()
    assert rt.device == "cuda" and not rt.bf16 and rt.default_precision() == "fp16"
    _fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", 8, 0)
    assert runtime.detect().default_precision() == "bf16"


def test_nvidia_smi_compute_capability_decides_bf16(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla T4", 7, 5, initialised=False, smi="Tesla T4, 15360, 7.5")
    rt = runtime.detect()
    assert (rt.gpu_name, rt.bf16) == ("Tesla T4", False)
    _fake_gpu(monkeypatch, "Tesla P100", 6, 0, initialised=False, smi="Tesla P100-PCIE-16GB, 16384, 6.0")
    assert not runtime.detect().bf16
    _fake_gpu(monkeypatch, "NVIDIA L4", 8, 9, initialised=False, smi="NVIDIA L4, 23034, 8.9")
    assert runtime.detect().bf16


def test_the_rehearsal_is_a_t4_on_the_cpu(monkeypatch):
    monkeypatch.setenv(runtime.REHEARSAL_ENV, "1")
    rt = runtime.detect()
    assert rt.rehearsal and rt.gpu_path and rt.device == "cpu" and rt.default_precision() == "fp16"
    monkeypatch.setenv(runtime.REHEARSAL_ENV, "0")
    assert not runtime.detect().rehearsal


def test_sdxl_family_auto_is_sdxl_base_or_the_tiny_sdxl_said_plainly(monkeypatch):
    import pytest

    model, why = runtime.choose_model("auto", CPU, family="sdxl")
    assert model == runtime.TINY_SDXL == "tiny-sdxl" and "OFFLINE model of SDXL" in why
    assert "RANDOM" in why and "NOT pretrained" in why  # its pictures are noise: said where it is chosen
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: False)
    model, why = runtime.choose_model("auto", T4, family="sdxl")
    assert model == "tiny-sdxl" and "hub cannot be reached" in why and runtime.SDXL_BASE in why
    monkeypatch.setattr(runtime, "hub_reachable", lambda timeout=3.0: True)
    assert runtime.choose_model("auto", T4, family="sdxl") == (runtime.SDXL_BASE,
                                                              f"GPU and hub available: using {runtime.SDXL_BASE}")
    assert runtime.choose_model("offline", T4, family="sdxl")[0] == "tiny-sdxl"  # offline, in an SDXL notebook
    assert runtime.choose_model("offline", T4)[0] == "offline"  # in an SD notebook: the toy model, as before
    assert runtime.choose_model("my/sdxl-finetune", CPU, family="sdxl")[0] == "my/sdxl-finetune"
    with pytest.raises(ValueError, match="family='sd3'.*sd, sdxl"):
        runtime.choose_model("auto", CPU, family="sd3")
