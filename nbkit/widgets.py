"""Notebook widgets that never block a headless run: an image upload box (ipywidgets 7 on Colab, or 8)."""

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
