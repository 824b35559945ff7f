from nbkit import runtime
from nbkit.runtime import Runtime

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


def test_precision_and_memory_settings_fit_the_gpu():
    assert T4.default_precision() == "fp16" and A100.default_precision() == "bf16" and CPU.default_precision() == "no"
    t4 = runtime.memory_settings(T4, train_text_encoder=True)
    assert t4["use_8bit_adam"] and t4["gradient_checkpointing"]
    assert not runtime.memory_settings(A100)["use_8bit_adam"]
    assert not runtime.memory_settings(T4)["gradient_checkpointing"]
    assert runtime.memory_settings(T4, with_prior_preservation=True)["gradient_checkpointing"]  # twice the images
    assert runtime.memory_settings(CPU)["mixed_precision"] == "no"
    assert "fp16 only" in T4.describe() and "no GPU" in CPU.describe()


def test_detect_on_this_machine():
    rt = runtime.detect()
    assert rt.platform in ("local", "colab", "kaggle") and rt.device in ("cpu", "cuda", "mps")
