"""Notebook widgets that never block a headless run (ipywidgets 7 on Colab, or 8): the photos cell (Colab's upload
dialog in one step), an image upload box, and a prompt playground for trying a model."""

from __future__ import annotations

from pathlib import Path


def _uploaded_files(value) -> list[tuple[str, bytes]]:
    """(name, content) pairs from a FileUpload value: a dict in ipywidgets 7, a tuple of dicts in 8."""
    if isinstance(value, dict):  # ipywidgets 7: {name: {"metadata": {...}, "content": bytes}}
        return [(name, bytes(item["content"])) for name, item in value.items()]
    return [(item["name"], bytes(item["content"])) for item in value]  # ipywidgets 8


def save_uploads(value, folder: str | Path) -> list[Path]:
    """Write the files of a FileUpload value into `folder` (names kept, path parts stripped)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in _uploaded_files(value):
        p = folder / Path(name).name
        p.write_bytes(content)
        paths.append(p)
    return paths


def upload_box(folder: str | Path):
    """A FileUpload widget that saves pictures into `folder` as soon as they are chosen. Returns the widget box.

    It does not wait: run the next cells after the upload finishes (the message under the box says when).
    """
    import ipywidgets as w

    up = w.FileUpload(accept="image/*", multiple=True, description="Upload photos")
    msg = w.HTML(f"Choose 3-10 photos of your subject; they are saved to <code>{folder}</code>.")

    def on_change(change):
        saved = save_uploads(change["new"], folder)
        if saved:
            msg.value = f"Saved {len(saved)} file(s) to <code>{folder}</code>. Now run the next cells."

    up.observe(on_change, names="value")
    return w.VBox([up, msg])


def upload_photos(folder: str | Path) -> list[Path]:
    """Colab's own upload dialog (google.colab.files.upload): the cell waits until the photos are chosen, then they
    are written into `folder` (names kept). Colab only; `photos(..., upload=True)` decides when to call it."""
    import inspect

    from google.colab import files  # only on Colab

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        direct = "target_dir" in inspect.signature(files.upload).parameters
    except (TypeError, ValueError):  # a C-level or wrapped function: ask the old way
        direct = False
    uploaded = files.upload(target_dir=str(folder)) if direct else files.upload()  # the old way saves into the cwd
    saved = save_uploads({name: {"content": data} for name, data in (uploaded or {}).items()}, folder)
    for name, data in (uploaded or {}).items():  # the copy the old way left in the working folder
        stray = Path.cwd() / name
        if not direct and stray.resolve() != (folder / Path(name).name).resolve() and stray.is_file() \
                and stray.read_bytes() == bytes(data):
            stray.unlink()
    return saved


def photos(folder: str | Path, size: int, upload: bool = False) -> list:
    """The photos cell in one call: with `upload` on Colab, the upload dialog first (saved into `folder`), then every
    picture in `folder` loaded and checked (`nbkit.data.images.load_folder`: bad files named, with what to do).
    Returns the examples. Never waits outside an interactive Colab notebook (papermill, Kaggle, Jupyter)."""
    from nbkit.data.images import load_folder
    from nbkit.data.subject import dog_dir
    from nbkit.env import colab
    from nbkit.paths import SAMPLE_INSTANCE_DIR

    folder = Path(folder)
    if upload:
        if folder.resolve() in (Path(SAMPLE_INSTANCE_DIR).resolve(), dog_dir().resolve()):
            raise ValueError("UPLOAD = True saves your photos into INSTANCE_DIR, which is the kit's sample subject "
                             '("sample"): set INSTANCE_DIR to a new folder name first, e.g. "my_dog", and CLASS_NOUN '
                             "to what the photos show.")
        if colab._interactive_colab():
            saved = upload_photos(folder)
            print(f"Saved {len(saved)} file(s) to {folder}." if saved else "No file chosen.")
        else:
            print(f"UPLOAD uses Colab's upload dialog; here, copy 3-10 photos of your subject into {folder} and run "
                  "this cell again.")
    examples = load_folder(folder, size)
    print(f"{len(examples)} pictures in {folder}" + ("" if len(examples) >= 3 else
                                                      " (3-10 photos of the subject work best)"))
    return examples


class Playground:
    """A prompt playground: prompt, negative prompt, scheduler, steps, guidance, seed -> an image grid.

    Built on ipywidgets (7 on Colab, or 8); nothing blocks: `Generate` runs `run()`, which a test or a headless run
    can call directly (it reads the widgets, draws with `nbkit.generate`, shows and returns the grid). Each image's
    noise depends only on its seed, so a seed found here reproduces anywhere with the same settings.
    """

    def __init__(self, pipe, prompt: str = "", negative_prompt: str = "", scheduler: str = "ddim", steps: int = 30,
                 guidance: float = 7.5, seed: int = 0, images: int = 4, size: int | None = None,
                 save_dir: str | Path | None = None):
        import ipywidgets as w

        from nbkit.sample.sampling import SCHEDULERS

        self.pipe, self.size, self.save_dir, self.last = pipe, size, save_dir, None
        wide = w.Layout(width="95%")
        self.prompt = w.Textarea(value=prompt, description="Prompt", layout=wide)
        self.negative_prompt = w.Text(value=negative_prompt, description="Negative", layout=wide,
                                      placeholder="what to keep out, e.g. blurry, lowres")
        self.scheduler = w.Dropdown(options=list(SCHEDULERS), value=scheduler, description="Scheduler")
        self.steps = w.IntSlider(value=steps, min=1, max=150, description="Steps")
        self.guidance = w.FloatSlider(value=guidance, min=1.0, max=20.0, step=0.5, description="Guidance")
        self.seed = w.IntText(value=seed, description="First seed")
        self.images = w.IntSlider(value=images, min=1, max=8, description="Images")
        self.button = w.Button(description="Generate", button_style="primary", icon="paint-brush")
        self.status = w.HTML("Write a prompt and press <b>Generate</b>.")
        self.image = w.Image(format="png")
        self.button.on_click(self.run)
        controls = w.HBox([w.VBox([self.scheduler, self.steps, self.guidance]),
                           w.VBox([self.seed, self.images, self.button])])
        self.widget = w.VBox([self.prompt, self.negative_prompt, controls, self.status, self.image])

    def settings(self) -> dict:
        """The current settings, as `nbkit.generate` keywords (copy them into a notebook to reproduce a grid)."""
        seed = int(self.seed.value)
        return dict(prompts=self.prompt.value.strip(), seeds=list(range(seed, seed + int(self.images.value))),
                    steps=int(self.steps.value), guidance=float(self.guidance.value), scheduler=self.scheduler.value,
                    negative_prompt=self.negative_prompt.value.strip() or None, size=self.size)

    def run(self, _button=None):
        """Draw the grid for the current settings; show it in the widget and return it (a PIL image)."""
        import io
        import time

        from nbkit.sample.sampling import generate, grid

        s = self.settings()
        if not s["prompts"]:
            self.status.value = "Write a prompt first."
            return None
        self.button.disabled = True
        self.status.value = f"Drawing {len(s['seeds'])} image(s) with {s['scheduler']}, {s['steps']} steps..."
        try:
            t = time.perf_counter()
            images = generate(self.pipe, **s)
            self.last = grid(images, cols=min(4, len(images)))
            buf = io.BytesIO()
            self.last.save(buf, format="PNG")
            self.image.value = buf.getvalue()
            msg = f"{len(images)} image(s), seeds {s['seeds'][0]}-{s['seeds'][-1]}, {time.perf_counter() - t:.1f} s."
            if self.save_dir:
                Path(self.save_dir).mkdir(parents=True, exist_ok=True)
                path = Path(self.save_dir) / f"playground_seed{s['seeds'][0]}_{s['scheduler']}_{s['steps']}.png"
                self.last.save(path)
                msg += f" Saved to <code>{path}</code>."
            self.status.value = msg
        except Exception as err:  # noqa: BLE001 - shown in the widget: a click handler's exception is otherwise lost
            self.status.value = f"<b>Failed:</b> {type(err).__name__}: {err}"
            raise
        finally:
            self.button.disabled = False
        return self.last


def prompt_playground(pipe, **defaults) -> Playground:
    """A Playground over `pipe`; `display(pg.widget)` shows it, `pg.run()` draws without a click."""
    return Playground(pipe, **defaults)
