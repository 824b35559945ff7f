"""Several subjects in one run (concepts_list): read in both key styles, checked all at once, drawn in turn (seeded,
resumable), each with its own class images, and each scored on its own."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nbkit import cli, load_parts, train
from nbkit.config import Concept, ConfigError, TrainConfig
from nbkit.data import concepts
from nbkit.scores import concepts as scored
from nbkit.scores import tracking
from nbkit.toy import world as toyworld
from nbkit.training import batches, checkpoint, methods


@pytest.fixture
def qlo_dir(tmp_path):
    """The toy world's second subject: a yellow circle with purple dots (5 pictures, backgrounds not yellow)."""
    d = tmp_path / "qlo"
    toyworld.write_subject_images(d, "qlo", n=5, size=64, seed=0, backgrounds=("white", "blue", "black"))
    return d


@pytest.fixture
def two(cfg, instance_dir, qlo_dir):
    """The shared test settings with two subjects instead of one."""
    return cfg.replace(instance_dir="", concepts_list=[
        {"instance_dir": str(d), "instance_prompt": f"a photo of {w} {n}", "class_prompt": f"a photo of a {n}"}
        for d, w, n in ((instance_dir, "zwx", "star"), (qlo_dir, "qlo", "circle"))])


class _Accelerator:  # what batches.prepare uses of accelerate's Accelerator
    device = torch.device("cpu")

    @staticmethod
    def main_process_first():
        import contextlib

        return contextlib.nullcontext()


def _batches(c, parts):
    return batches.prepare(c, parts, methods.setup(c, parts), _Accelerator(), torch.float32)


def test_both_key_styles_json_text_and_file_read_alike(two, tmp_path, instance_dir, qlo_dir):
    shivam = [{"instance_prompt": "a photo of zwx star", "class_prompt": "a photo of a star",
               "instance_data_dir": str(instance_dir), "class_data_dir": str(tmp_path / "stars")},
              {"instance_prompt": "a photo of qlo circle", "class_prompt": "a photo of a circle",
               "instance_data_dir": str(qlo_dir), "class_data_dir": str(tmp_path / "circles")}]
    mine = [{"instance_dir": c["instance_data_dir"], "instance_prompt": c["instance_prompt"],
             "class_prompt": c["class_prompt"], "class_dir": c["class_data_dir"]} for c in shivam]
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(shivam))
    read = [two.replace(concepts_list=v).concepts() for v in (shivam, mine, str(path), json.dumps(shivam))]
    assert all(r == read[0] for r in read)
    assert read[0] == [Concept(str(instance_dir), "a photo of zwx star", "a photo of a star", str(tmp_path / "stars")),
                       Concept(str(qlo_dir), "a photo of qlo circle", "a photo of a circle",
                               str(tmp_path / "circles"))]
    assert [c.word for c in read[0]] == ["zwx", "qlo"]  # the word each class prompt lacks
    assert Concept("x", "a photo of zwx star").word == "zwx"  # no class prompt: the word before the class noun
    assert Concept("x", "a zwx dog on the beach", identifier="zwx").word == "zwx"
    # one subject: the four fields, as before
    one = two.replace(concepts_list=[], instance_dir=str(instance_dir))
    assert one.concepts() == [Concept(str(instance_dir), "a photo of zwx star", "", "", "zwx")]


def test_cli_takes_a_json_file_and_config_files_a_list(two, tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(two.concepts_list))
    cfg, _, given = cli.build_config(cli.parse(["train", "--concepts_list", str(path), "--output_dir", "o"]))
    assert cfg.concepts_list == str(path) and "concepts_list" in given
    assert [c.word for c in cfg.validate().concepts()] == ["zwx", "qlo"]
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"concepts_list": two.concepts_list, "output_dir": "o"}))
    cfg, _, _ = cli.build_config(cli.parse(["train", "--config", str(run)]))
    assert cfg.concepts_list == two.concepts_list and len(cfg.validate().concepts()) == 2
    assert "several subjects in one run" in TrainConfig.field_help()["concepts_list"]  # its --help


def test_every_problem_is_reported_at_once(two, tmp_path, instance_dir):
    bad = TrainConfig(**{**two.to_dict(), "instance_dir": str(instance_dir), "with_prior_preservation": True,
                         "concepts_list": [
                             {"instance_dir": str(tmp_path / "nope"), "instance_prompt": "a photo of zwx star",
                              "class_prompt": "a photo of zwx star", "colour": "red"},
                             {"instance_data_dir": str(instance_dir), "instance_prompt": "  "},
                             {"instance_dir": str(instance_dir), "instance_prompt": "a photo of zwx star",
                              "class_prompt": "a photo of a star", "class_dir": str(tmp_path / "c")},
                             {"instance_dir": str(instance_dir), "instance_prompt": "a photo of qlo circle",
                              "class_prompt": "a photo of a circle", "class_dir": str(tmp_path / "c")},
                             {"instance_dir": str(instance_dir / "zwx_00.png"), "instance_prompt": "a photo of vrk",
                              "identifier": "vrk heart", "class_prompt": "a photo of a heart", "class_dir": "h"}]})
    with pytest.raises(ConfigError) as err:
        bad.validate()
    text = str(err.value)
    for part in ("concept 1: unknown keys ['colour']", "concept 2: instance_prompt missing or empty",
                 "concepts_list replaces instance_dir", "concept 1 ('a photo of zwx star'): class_prompt equals "
                 "instance_prompt", "concept 1 ('a photo of zwx star'): with_prior_preservation=True needs class_dir",
                 "does not exist", "same identifier ('zwx')", "is given for 2 class prompts", "is a file, not a folder",
                 "its identifier 'vrk heart' is not a word of its instance_prompt"):
        assert part in text, part
    assert text.count("\n  - ") == 10  # each problem once, all in one message
    with pytest.raises(ConfigError, match="textual_inversion': TI learns one new token"):
        two.replace(method="textual_inversion")
    for value, says in ((str(tmp_path / "none.json"), "no such file"), ("[{", "not valid JSON"),
                        ('{"instance_dir": "x"}', "expected a list of concepts")):
        with pytest.raises(ConfigError, match=says):
            two.replace(concepts_list=value)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a list of concepts"):
        two.replace(concepts_list=str(tmp_path / "bad.json"))


def test_concepts_come_in_turn_seeded_and_as_a_function_of_the_step():
    groups = [concepts.Group([0, 1]), concepts.Group([2, 3, 4]), concepts.Group([5])]
    order = [concepts.pick(groups, m, seed=0) for m in range(30)]
    for r in range(10):  # every concept once a round, its own draw number the round
        assert sorted(groups.index(g) for g, _ in order[3 * r:3 * r + 3]) == [0, 1, 2]
        assert all(n == r for _, n in order[3 * r:3 * r + 3])
    assert [concepts.pick(groups, m, seed=0) for m in range(30)] == order  # no hidden state: a resume draws the same
    other = [groups.index(concepts.pick(groups, m, seed=5)[0]) for m in range(30)]
    assert other != [groups.index(g) for g, _ in order]  # the seed decides the order
    assert concepts.pick(groups[:1], 7, 0) == (groups[0], 7)  # one subject: as before
    assert concepts.fingerprint(groups[:1]) == {}  # one subject's checkpoints are unchanged
    assert concepts.fingerprint(groups) != concepts.fingerprint([concepts.Group([0, 1, 2]), *groups[1:]])


def test_each_step_draws_one_concept_with_its_own_class_images(two, parts, tmp_path):
    c = two.replace(with_prior_preservation=True, num_class_images=2, train_batch_size=2, concepts_list=[
        {**k, "class_dir": str(tmp_path / name)} for k, name in zip(two.concepts_list, ("stars", "circles"))])
    b = _batches(c, parts)
    for name, prompt in (("stars", "a photo of a star"), ("circles", "a photo of a circle")):
        assert json.loads((tmp_path / name / ".nbkit_class.json").read_text())["prompt"] == prompt
        assert len(list((tmp_path / name).glob("class_*.png"))) == 2  # num_class_images each, in its own folder
    assert len(b.instance) == 10 and len(b.class_ex) == 4 and "concepts" in b.fingerprint()
    seen = []
    for micro in range(6):
        _, prompts, _ = b.draw(micro, torch.Generator().manual_seed(micro))
        inst, cls = prompts[:2], prompts[2:]
        assert len(set(inst)) == 1 and len(set(cls)) == 1  # one concept per micro-step
        word = inst[0].split()[-2]
        assert cls[0] == {"zwx": "a photo of a star", "qlo": "a photo of a circle"}[word]  # paired with its own
        seen.append(word)
    assert sorted(seen[0:2]) == sorted(seen[2:4]) == sorted(seen[4:6]) == ["qlo", "zwx"]  # in turn


def test_two_subjects_resume_to_the_same_weights(two, tmp_path):
    c = two.replace(with_prior_preservation=True, num_class_images=2, max_train_steps=3, checkpointing_steps=1,
                    checkpoints_total_limit=None, output_dir=str(tmp_path / "whole"), concepts_list=[
                        {**k, "class_dir": str(tmp_path / name)} for k, name in zip(two.concepts_list, ("s", "c"))])
    whole = train(c, load_parts("offline"), progress=False)
    first = Path(c.output_dir) / "checkpoints" / "step_000001"  # mid-round: the second concept comes next
    assert json.loads((first / checkpoint.INFO).read_text())["data"]["concepts"]["count"] == 2
    resumed = train(c.replace(output_dir=str(tmp_path / "resumed"), resume=str(first)), load_parts("offline"),
                    progress=False)
    assert resumed.info["resumed_from"] == first and resumed.losses == whole.losses
    a, b = (load_file(Path(r.output_dir) / "model" / "unet" / "diffusion_pytorch_model.safetensors")
            for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    swapped = c.replace(output_dir=str(tmp_path / "swapped"), resume=str(first),
                        concepts_list=[c.concepts_list[0], {**c.concepts_list[1], "instance_dir": c.concepts_list[0][
                            "instance_dir"], "instance_prompt": "a photo of qlo star"}])
    with pytest.raises(checkpoint.ResumeError, match="pictures or their captions changed"):
        train(swapped, load_parts("offline"), progress=False)


def test_toy_world_learns_two_subjects_at_once_each_scored(two, parts, tmp_path):
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    c = two.replace(max_train_steps=4, train_batch_size=2, learning_rate=5e-4, eval_steps=4, eval_seeds=1,
                    keep_best=False, report_to="none", checkpointing_steps=0)  # a short run: scores low, but there
    r = train(c, parts, progress=False)
    assert len(r.losses) == 4 and all(math.isfinite(x) for x in r.losses)
    after = r.parts.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained
    row = r.metrics[-1]
    each = scored.per_concept(row)
    assert sorted(each) == ["qlo", "zwx"] and row["scorer"] == "toy judge"
    for word, s in each.items():
        assert {"subject_fidelity", "prompt_fidelity", "class_drift", "tradeoff"} <= set(s), word
        assert all(0 <= s[k] <= 1 for k in ("subject_fidelity", "prompt_fidelity", "class_drift")), word
    for k in ("subject_fidelity", "prompt_fidelity", "tradeoff"):  # the headline numbers: the subjects' mean
        assert row[k] == pytest.approx(sum(s[k] for s in each.values()) / 2, abs=1e-4)
    assert json.loads((r.output_dir / tracking.METRICS_FILE).read_text())[-1] == row
    assert "qlo" in scored.table(row) and "zwx" in scored.table(row)
    assert sorted(scored.per_concept(r.best)) == ["qlo", "zwx"]  # best.json keeps each subject's scores too
    final = tracking.score_result(r)  # the final model, scored per subject
    assert sorted(scored.per_concept(final)) == ["qlo", "zwx"]
    ev = tracking.run_evaluator(c, r.parts, verbose=False)
    assert {w: e.subject for w, e in ev.evaluators.items()} == {"zwx": "zwx", "qlo": "qlo"}  # each its own subject
