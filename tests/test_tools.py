"""The instructor tools: class images made once for a whole class."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_class_images_made_once_and_reused(offline_dir, tmp_path, capsys):
    tool = load_tool("class_images")
    out = tmp_path / "shared" / "star"
    args = ["--model", "offline", "--prompt", "a photo of a star", "--out", str(out), "--count", "2", "--steps", "1"]
    tool.main(args)
    made = sorted(p.name for p in out.glob("class_*.png"))
    assert made == ["class_00000.png", "class_00001.png"]
    assert json.loads((out / ".nbkit_class.json").read_text())["prompt"] == "a photo of a star"
    stamp = (out / "class_00000.png").stat().st_mtime_ns
    tool.main(args)  # a second run (another student, another session) reuses them
    assert (out / "class_00000.png").stat().st_mtime_ns == stamp
    assert "2 class images" in capsys.readouterr().out
