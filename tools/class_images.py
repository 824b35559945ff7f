"""Make the class images of prior preservation once, for a whole class (nbkit.prior.ensure_class_images).

Every student then points CLASS_DIR at the same folder: nobody waits for generation, and the folder is reused by
every notebook and run. Already present images are kept (an interrupted run resumes); a folder made for another
prompt is refused. One folder per class prompt:

    python tools/class_images.py --prompt "a photo of a dog" --out shared/class_images/dog --count 200
    python tools/class_images.py --model offline --prompt "a photo of a star" --out shared/class_images/star
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", required=True, help='the class, without the identifier, e.g. "a photo of a dog"')
    ap.add_argument("--out", required=True, help="folder for the images (shared by the whole class)")
    ap.add_argument("--model", default="auto", help='"auto" (SD 1.5 on a GPU with the hub), a hub id, a folder, or "offline"')
    ap.add_argument("--count", type=int, default=200, help="images to have in the folder (the course uses ~200)")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default: 512, or 64 for the offline model)")
    ap.add_argument("--steps", type=int, default=50, help="inference steps per image")
    ap.add_argument("--batch-size", type=int, default=4, help="images per batch (lower it if the GPU runs out of memory)")
    ap.add_argument("--seed", type=int, default=0, help="base seed (image i uses seed*10000 + i)")
    a = ap.parse_args(argv)

    import torch

    import nbkit
    from nbkit import offline, runtime
    from nbkit.prior import ensure_class_images

    rt = runtime.detect()
    model, why = runtime.choose_model(a.model, rt)
    print(rt.describe())
    print(why)
    parts = nbkit.load_parts(model)
    small = parts.source == str(offline.offline_model_dir())
    resolution = a.resolution or (offline.OFFLINE_RESOLUTION if small else 512)
    dtype = torch.float16 if rt.device == "cuda" else torch.float32
    t = time.perf_counter()
    paths = ensure_class_images(parts, a.prompt, a.out, a.count, resolution, seed=a.seed, batch_size=a.batch_size,
                                steps=a.steps, device=rt.device, dtype=dtype)
    print(f"{len(paths)} class images for {a.prompt!r} in {a.out} ({time.perf_counter() - t:.0f} s). "
          f"Point class_dir at this folder (with class_prompt {a.prompt!r}) in every run.")


if __name__ == "__main__":
    main()
