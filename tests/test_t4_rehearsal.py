"""The T4 path rehearsed on the CPU (NBKIT_T4_REHEARSAL=1): every method, the checks of benchmarks/t4_path.py.

A T4 trains with fp16 frozen weights beside fp32 trained ones, fp16 autocast, a GradScaler, 8-bit AdamW, gradient
checkpointing and (8gb preset) the optimizer in backward. No CI machine has a GPU, so these tests take exactly
those lines on CPU kernels; benchmarks/gpu_check.py repeats the same checks on a CUDA GPU.
"""

import pytest

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


@pytest.fixture(scope="module")
def ti_run(rehearsal, workdir, instance):
    return t4_path.run("textual_inversion", workdir, instance)


CASES = [c for c in t4_path.CASES if c not in ("textual_inversion", "ti_dreambooth")]


@pytest.mark.parametrize("case", CASES)
def test_each_method_takes_the_t4_path(rehearsal, workdir, instance, case):
    facts = t4_path.run(case, workdir, instance)
    assert t4_path.check(facts) == []
    assert facts.result.info["precision"] == "fp16"
    if case == "8gb":
        assert facts.result.info["optimizer_in_backward"]


def test_textual_inversion_then_dreambooth_take_the_t4_path(ti_run, workdir, instance):
    assert t4_path.check(ti_run) == []
    facts = t4_path.run("ti_dreambooth", workdir, instance, embedding=ti_run.result.saved)
    assert t4_path.check(facts) == []
    assert "<zwx>" in facts.result.parts.tokenizer.get_vocab()


def test_the_checks_fail_on_the_fp32_cpu_path(workdir, instance, monkeypatch):
    """Without the rehearsal the CPU trains in fp32 with torch AdamW: the checks must say so (they can fail)."""
    monkeypatch.delenv("NBKIT_T4_REHEARSAL", raising=False)
    facts = t4_path.run("lora", workdir / "fp32", instance, use_8bit_adam=False)
    problems = " ".join(t4_path.check(facts))
    assert "precision 'no'" in problems and "not 8-bit" in problems and "frozen in torch.float32" in problems


def test_fp16_exports_reload_to_the_same_picture(ti_run, rehearsal, workdir, instance):
    lora = t4_path.run("lora", workdir / "export", instance)
    dreambooth = t4_path.run("dreambooth", workdir / "export", instance)  # a diffusers folder and a single file
    for facts in (dreambooth, lora, ti_run):
        assert t4_path.check_export(facts, workdir / "home" / facts.case) == []
