import pytest

from nbkit import ConfigError, TrainConfig


def messages(**kw):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw).validate()
    return str(e.value)


def test_defaults_are_valid_with_a_folder(tmp_path):
    assert TrainConfig(instance_dir=str(tmp_path)).validate()


@pytest.mark.parametrize("kw, expect", [
    (dict(learning_rate=-1e-6), "learning_rate=-1e-06: must be > 0"),
    (dict(learning_rate=0), "learning_rate=0: must be > 0"),
    (dict(resolution=500), "resolution=500: must be a positive multiple of 8"),
    (dict(max_train_steps=0), "max_train_steps=0: must be at least 1"),
    (dict(method="magic"), "method='magic': choose one of dreambooth, lora, textual_inversion"),
    (dict(mixed_precision="fp8"), "mixed_precision='fp8'"),
    (dict(instance_prompt="a photo of a dog"), "does not contain 'zwx' as a word"),
    (dict(instance_prompt="a photo of zwxdog"), "does not contain 'zwx' as a word"),
    (dict(with_prior_preservation=True, class_dir="c"), "needs class_prompt"),
    (dict(with_prior_preservation=True, class_dir="c", class_prompt="a photo of zwx star"),
     "class_prompt equals instance_prompt"),
    (dict(with_prior_preservation=True, class_dir="c", class_prompt="zwx stars"), "contains the identifier"),
    (dict(with_prior_preservation=True, class_prompt="a star"), "needs class_dir"),
    (dict(method="textual_inversion"), "does not contain '<zwx>'"),
    (dict(noise_offset=2.0), "noise_offset=2.0: \"auto\" or a number from 0 to 1"),
    (dict(noise_offset="yes"), "noise_offset='yes'"),
    (dict(snr_gamma=-1), "snr_gamma=-1: \"auto\" or a number >= 0"),
    (dict(method="textual_inversion", instance_prompt="a <zwx>", initializer_token="two words"), "must be one word"),
])
def test_impossible_settings_are_named(tmp_path, kw, expect):
    assert expect in messages(instance_dir=str(tmp_path), **kw)


def test_all_problems_reported_at_once(tmp_path):
    msg = messages(instance_dir=str(tmp_path / "nope"), learning_rate=-1, resolution=100)
    assert "does not exist" in msg and "learning_rate" in msg and "resolution" in msg


def test_missing_or_file_instance_dir(tmp_path):
    assert "instance_dir is empty" in messages(instance_dir="")
    f = tmp_path / "a.png"
    f.write_bytes(b"x")
    assert "is a file, not a folder" in messages(instance_dir=str(f))


def test_replace_validates(tmp_path):
    c = TrainConfig(instance_dir=str(tmp_path))
    assert c.replace(learning_rate=1e-6).learning_rate == 1e-6
    with pytest.raises(ConfigError):
        c.replace(learning_rate=-1)


def test_checkpoint_and_resume_settings(tmp_path):
    msg = messages(instance_dir=str(tmp_path), checkpointing_steps=-1, checkpoints_total_limit=0,
                   resume=str(tmp_path / "nope"))
    assert "checkpointing_steps=-1: must be >= 0" in msg
    assert "checkpoints_total_limit=0: must be None (keep all) or at least 1" in msg
    assert "not a complete checkpoint folder" in msg and "'auto'" in msg
    for ok in ("auto", "never", None):
        assert TrainConfig(instance_dir=str(tmp_path), resume=ok).validate()
