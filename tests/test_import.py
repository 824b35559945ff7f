"""`import nbkit` loads no GPU library: bitsandbytes (its setup queries the GPU) and CUDA wait until a run needs
them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
import nbkit, torch
print(json.dumps({"file": nbkit.__file__, "cuda": torch.cuda.is_initialized(),
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("bitsandbytes", "deepspeed", "peft")
                                   or m.startswith(("diffusers.quantizers.bitsandbytes", "diffusers.models")))}))
"""


def test_import_nbkit_loads_neither_bitsandbytes_nor_cuda():
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve() == (ROOT / "nbkit" / "__init__.py").resolve()  # this checkout's nbkit
    assert got["loaded"] == [], (f"`import nbkit` imported {got['loaded'][:8]}: import them inside the functions "
                                 "that need them")
    assert got["cuda"] is False
    assert "gemm_4bit" not in p.stderr  # bitsandbytes' own import-time message
