"""Export a ~170 MB model in fp16 in a fresh process and measure the host memory the export adds (see test_export.py).

usage: python tests/_export_memory_worker.py {diffusers,single_file} <folder>
Prints one JSON line: {"model_bytes": fp32 bytes of the model, "extra_bytes": peak anonymous RSS during the export
minus before it}. Anonymous memory only: pages of a file mapped while it is read are the page cache, which the
kernel takes back under pressure; a copy of the weights is not.
"""

import gc
import json
import sys
import threading
from pathlib import Path

import torch


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class Peak:
    """The largest anonymous RSS seen while the block runs (sampled every millisecond by a thread)."""

    def __enter__(self):
        self.peak, self._stop = anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anon_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_bytes())


def export(mode: str, parts, out: Path) -> None:
    from nbkit.export import formats as ex
    from nbkit.export import singlefile

    if mode == "diffusers":
        ex.diffusers_folder(parts, out / "folder", dtype="fp16")
    else:
        singlefile.save_single_file(parts, out / "model.safetensors", half=True)


def main() -> None:
    from diffusers import UNet2DConditionModel

    from nbkit import load_parts

    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    parts = load_parts("offline")
    export(mode, parts, out / "warm-up")  # the imports and first-call caches are not what is measured
    config = {**parts.unet.config, "block_out_channels": [160, 320, 320]}  # the offline UNet, 5x wider: ~170 MB
    torch.manual_seed(0)
    parts.unet = UNet2DConditionModel.from_config(config)
    model_bytes = sum(p.numel() * p.element_size() for m in (parts.unet, parts.text_encoder, parts.vae)
                      for p in m.parameters())
    gc.collect()
    before = anon_bytes()
    with Peak() as peak:
        export(mode, parts, out / "big")
    print(json.dumps({"model_bytes": model_bytes, "extra_bytes": peak.peak - before}))


if __name__ == "__main__":
    main()
