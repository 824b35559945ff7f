"""The run manifest: `run_manifest.json` in the output folder says how a result was made.

Library versions (torch, diffusers, transformers, accelerate, peft, ...), Python, the device and precision, the
full settings, when the run started and ended, how many steps it did, and which checkpoint it resumed from.
Every session of a run (a first attempt, a resumption after a disconnect) is kept in `sessions`, newest last;
the top level describes the latest. It is rewritten atomically as the run goes, so even a killed run leaves
one that says how far it got.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path

from nbkit.safeio import atomic_write

FILE = "run_manifest.json"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "bitsandbytes", "numpy",
            "pillow")


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the libraries a run depends on (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    from nbkit.version import __version__

    out["nbkit"] = __version__
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Run:
    """Records one session of a training run into output_dir/run_manifest.json."""

    def __init__(self):
        self.path: Path | None = None
        self.data: dict = {}
        self.steps_done = 0

    def start(self, output_dir: str | Path, config: dict, device: dict) -> None:
        """Begin a session: keep the earlier sessions of this output folder, describe this one."""
        import torch

        self.path = Path(output_dir) / FILE
        earlier = []
        if self.path.exists():
            try:
                earlier = json.loads(self.path.read_text()).get("sessions", [])
            except (OSError, ValueError):
                earlier = []
        self.data = {
            "status": "running", "started": now(), "ended": None, "steps_done": 0,
            "max_train_steps": config.get("max_train_steps"), "resumed_from": None, "resumed_at_step": None,
            "last_checkpoint": None, "saved": None, "error": None,
            "versions": versions(),
            "device": {**device, "torch_cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
                       "platform": platform.platform(), "executable": sys.executable},
            "config": config, "sessions": earlier,
        }
        self.write()

    def update(self, **fields) -> None:
        if self.path is None:
            return
        self.data.update(fields)
        self.steps_done = self.data.get("steps_done", self.steps_done)
        self.write()

    def finish(self, status: str, **fields) -> None:
        """End this session ('finished', 'failed', 'interrupted') and file it under sessions."""
        if self.path is None:
            return
        self.data.update(status=status, ended=now(), **fields)
        keep = ("status", "started", "ended", "steps_done", "resumed_from", "resumed_at_step", "last_checkpoint",
                "error")
        self.data["sessions"] = self.data["sessions"] + [{k: self.data[k] for k in keep}]
        self.write()

    def stopped(self, err: BaseException) -> None:
        """Record how an exception ended the session (if it had started)."""
        interrupted = isinstance(err, KeyboardInterrupt)
        first = (str(err).strip().splitlines() or [""])[0]
        self.finish("interrupted" if interrupted else "failed", steps_done=self.steps_done,
                    error=f"{type(err).__name__}: {first}"[:500])

    def write(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=1, default=str))


def read(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / FILE).read_text())


def summary(output_dir: str | Path) -> str:
    """A few lines for a notebook: where the manifest is, the versions, the device, the steps, any resumption."""
    m = read(output_dir)
    v = m["versions"]
    libs = " · ".join(f"{k} {v[k]}" for k in ("python", "torch", "diffusers", "transformers", "accelerate", "peft")
                      if v.get(k))
    lines = [f"run manifest: {Path(output_dir) / FILE}", libs,
             f"{m['device'].get('runtime', m['device'].get('device'))} · precision {m['device'].get('precision')} · "
             f"seed {m['config'].get('seed')} · {m['steps_done']}/{m['max_train_steps']} steps · {m['status']} "
             f"({m['started']} -> {m['ended']})"]
    if m.get("resumed_from"):
        lines.append(f"resumed at step {m['resumed_at_step']} from {m['resumed_from']}")
    if len(m.get("sessions", [])) > 1:
        lines.append(f"{len(m['sessions'])} sessions: " + ", ".join(
            f"{s['status']} at step {s['steps_done']}" for s in m["sessions"]))
    return "\n".join(lines)
