"""Safe loading: the kit writes only safetensors, unpickles only with weights_only=True, never trusts remote code."""

import ast
import json
from pathlib import Path

import pytest
import torch

from nbkit import load_parts, train
from nbkit.safeio import UnsafeFile, load_tensors

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "nbkit").rglob("*.py"))


def calls(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_is_weights_only():
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and node.module == "torch"
                    and any(a.name == "load" for a in node.names)):
                bad.append(f"{path.name}:{node.lineno}: `from torch import load` hides torch.load from this check")
        for node, name in calls(path):
            if name.endswith("torch.load") and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)


def test_nothing_pickled_is_written_or_read_and_no_remote_code():
    bad = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        if "trust_remote_code" in text:
            bad.append(f"{path.name}: trust_remote_code")
        for node, name in calls(path):
            if name in ("torch.save", "pickle.dump", "pickle.dumps", "pickle.load", "pickle.loads", "dill.load"):
                bad.append(f"{path.name}:{node.lineno}: {name}")
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if "trust_remote_code" in nb.read_text(encoding="utf-8"):
            bad.append(f"{nb.name}: trust_remote_code")
    assert not bad, "\n".join(bad)


def test_a_run_writes_only_safetensors_json_and_images(cfg, tmp_path):
    c = cfg.replace(train_text_encoder=True, max_train_steps=1, checkpointing_steps=1)
    train(c, load_parts("offline"), progress=False)
    written = [p for p in Path(c.output_dir).rglob("*") if p.is_file()]
    assert any(p.parent.name == "step_000001" for p in written)  # the checkpoint is there too
    logs = Path(c.output_dir) / "logs"  # TensorBoard's own formats (report_to="auto"): protobuf events, YAML
    odd = [str(p) for p in written if p.suffix not in (".safetensors", ".json", ".png", ".txt")
           and not (logs in p.parents and (p.name.startswith("events.out.tfevents.") or p.name == "hparams.yml"))]
    assert not odd, odd
    info = json.loads((Path(c.output_dir) / "checkpoints" / "step_000001" / "checkpoint.json").read_text())
    assert all(n.endswith(".safetensors") for n in info["weights"] + info["optimizer_files"])


class Payload:  # a pickle that would build an arbitrary object
    def __init__(self):
        self.x = 1


def test_load_tensors_reads_plain_pickles_and_refuses_code(tmp_path):
    torch.save({"emb": torch.ones(2, 3)}, tmp_path / "learned_embeds.bin")
    assert torch.equal(load_tensors(tmp_path / "learned_embeds.bin")["emb"], torch.ones(2, 3))
    torch.save({"emb": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFile, match="evil.pt is a pickle that holds more than tensors"):
        load_tensors(tmp_path / "evil.pt")


def test_optimizer_and_ema_state_round_trip_through_safetensors(tmp_path):
    from diffusers.training_utils import EMAModel

    from nbkit.safeio import load_tree, save_tree

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    ema = EMAModel(list(net.parameters()), decay=0.9)
    ema.step(list(net.parameters()))
    state = {"opt": opt.state_dict(), "ema": ema.state_dict(), "step": 7}
    path = save_tree(state, tmp_path / "state.safetensors")
    back = load_tree(path)
    assert back["step"] == 7 and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert set(back["opt"]["state"]) == {0, 1}  # integer keys stay integers
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    again = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    again.load_state_dict(back["opt"])
    assert again.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(a, b) for a, b in zip(back["ema"]["shadow_params"], ema.shadow_params))
    with pytest.raises(TypeError):
        save_tree({"f": object()}, tmp_path / "bad.safetensors")


def test_save_tree_files_of_the_earlier_layout_still_load(tmp_path):
    """Before split_tree, every dict was {"__dict__": pairs} and tensors were named t0, t1, ..."""
    from nbkit.safeio import load_tree, save_tensors

    skeleton = {"__dict__": [["step", 7], [0, {"__dict__": [["exp_avg", {"__tensor__": "t0"}]]}],
                             ["betas", {"__tuple__": [0.9, 0.99]}]]}
    save_tensors({"t0": torch.ones(2)}, tmp_path / "old.safetensors", metadata={"nbkit_tree": json.dumps(skeleton)})
    back = load_tree(tmp_path / "old.safetensors")
    assert back["step"] == 7 and back["betas"] == (0.9, 0.99) and torch.equal(back[0]["exp_avg"], torch.ones(2))


def test_save_streaming_writes_a_safetensors_file_tensor_by_tensor(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from nbkit.safeio import save_streaming

    tensors = {"w": torch.randn(3, 5), "ids": torch.arange(7), "h": torch.randn(2).half(),
               "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(3.5, dtype=torch.bfloat16), "q": torch.arange(5, dtype=torch.uint8)}
    asked = []
    path = save_streaming(tmp_path / "x.safetensors", {k: (v.dtype, v.shape) for k, v in tensors.items()},
                          lambda k: asked.append(k) or tensors[k], {"format": "pt"})
    assert sorted(asked) == sorted(tensors)  # each asked for once
    back = load_file(path)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError,
                       match="w: got a torch.float32 tensor of shape \\(3, 5\\), the header says torch.float16"):
        save_streaming(tmp_path / "bad.safetensors", {"w": (torch.float16, (3, 5))}, lambda k: tensors[k])
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no half-written file left behind
