"""Sweeps, the results: every run folder of a sweep as a row (results.csv), the plots, a markdown table, the
picture grid, and score() to measure finished runs after the fact. Reads run folders only; runs nothing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from nbkit.notebook.sweep_spec import OK, SweepError, _fmt, load_spec

# ---------------------------------------------------------------- collect
_SKIP_DIRS = {"checkpoints", "model", "best", "class_images"}


def _json_files(folder: Path, name: str) -> dict[str, Path]:
    """{prefix: path} of every `name` in a run folder: prefix "" at the top, "sub/" in a subfolder."""
    found = {}
    for p in sorted(folder.rglob(name)):
        rel = p.parent.relative_to(folder)
        if set(rel.parts) & _SKIP_DIRS:
            continue
        found["" if rel == Path(".") else rel.as_posix() + "/"] = p
    return found


def _read_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _numbers(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_row(folder: str | Path) -> dict:
    """One run folder as a flat row: parameters, status, seconds, final loss and final metrics."""
    folder = Path(folder)
    rec = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    row: dict[str, Any] = {"run": folder.name, **rec.get("parameters", {})}
    row.update(status=rec.get("status", "todo"), seconds=rec.get("seconds"), error=rec.get("error") or "")
    for prefix, p in _json_files(folder, "losses.json").items():
        log = _read_rows(p)
        if log:
            tail = [r["loss"] for r in log[-max(1, len(log) // 10):] if "loss" in r]
            row[f"{prefix}steps"] = log[-1].get("step", len(log))
            row[f"{prefix}loss"] = log[-1].get("loss")
            row[f"{prefix}loss_last10pct"] = sum(tail) / len(tail) if tail else None
            for k, v in _numbers(log[-1]).items():  # lr, and loss terms such as prior preservation's
                if k not in ("step", "loss"):
                    row[f"{prefix}{k if k == 'lr' else 'loss_' + k}"] = v
    for prefix, p in _json_files(folder, "metrics.json").items():
        rows = _read_rows(p)
        if rows:
            for k, v in _numbers(rows[-1]).items():
                row[f"{prefix}{'eval_step' if k == 'step' else k}"] = v
    img = final_image(folder)
    row["image"] = img.relative_to(folder).as_posix() if img else ""
    return row


def baseline(folder: str | Path, prefix: str = "") -> dict | None:
    """The base model's scores, measured the way the runs are: the step-0 row of every finished run's
    metrics.json (the training loop scores the untrained model first, with the run's own scorer, prompts and seeds).

    Averaged over the runs, with `runs` (how many) and `spread` (the largest difference between two runs on one
    score: 0 when sampling is deterministic); `prefix` reads a subfolder's metrics ("with_prior/"). None when no
    finished run was scored."""
    found = []
    for p in _run_folders(Path(folder)):
        rec = json.loads((p / "run.json").read_text())
        first = next((r for r in _read_rows(p / prefix / "metrics.json") if r.get("step") == 0), None)
        if rec.get("status") == OK and first:
            found.append(first)
    if not found:
        return None
    keys = [k for k in _numbers(found[0]) if k not in ("step", "seconds") and all(k in r for r in found)]
    base: dict[str, Any] = {k: sum(r[k] for r in found) / len(found) for k in keys}
    base.update(runs=len(found), spread=max((max(r[k] for r in found) - min(r[k] for r in found) for k in keys),
                                            default=0.0), scorer=found[0].get("scorer", ""))
    return base


def final_image(folder: str | Path) -> Path | None:
    """A run's last validation grid (validation/step_*.png), else its last sample image, else None."""
    folder = Path(folder)
    for pattern in ("validation/step_*.png", "*/validation/step_*.png", "samples/after_*.png", "samples/*.png",
                    "*.png"):
        found = sorted(folder.glob(pattern))
        if found:
            return max(found, key=lambda f: f.name) if "validation" in pattern else found[0]  # the latest step
    return None


def _run_folders(folder: Path) -> list[Path]:
    runs_dir = folder / "runs"
    spec_file = folder / "sweep.json"
    found = sorted(p.parent for p in runs_dir.glob("*/run.json"))
    if spec_file.is_file():  # the spec's order (the grid's), then any others
        try:
            s = load_spec(json.loads(spec_file.read_text()), output=folder, check=False)
            order = {r.name: i for i, r in enumerate(s.runs())}
            found.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
        except SweepError:
            pass
    return found


def grid_keys(rows: list[dict], folder: Path | None = None) -> list[str]:
    """The parameters that vary across the runs, in the sweep's order."""
    keys: list[str] = []
    if folder and (folder / "sweep.json").is_file():
        keys = list(json.loads((folder / "sweep.json").read_text()).get("grid", {}))
    if not keys and folder:
        for p in _run_folders(folder):
            keys = list(json.loads((p / "run.json").read_text()).get("point", {}))
            break
    return [k for k in keys if any(k in r for r in rows)]


def collect(folder: str | Path, plots: bool = True, as_frame: bool = False):
    """Rows of every run in a sweep folder; writes results.csv and (with `plots`) final.png, curves.png, images.png.

    Returns a list of dicts, or a pandas DataFrame with `as_frame=True` (pandas is not a dependency of the kit).
    """
    folder = Path(folder)
    if not (folder / "runs").is_dir():
        raise SweepError(f"{folder} holds no sweep (no runs/ folder): give the output folder of a sweep.")
    rows = [run_row(p) for p in _run_folders(folder)]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    if plots and rows:
        import matplotlib

        if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, fig in (("final.png", plot_final(rows, folder)), ("curves.png", plot_curves(folder, rows)),
                          ("images.png", image_grid(folder, rows))):
            if fig is not None:
                fig.savefig(folder / name, dpi=110, bbox_inches="tight")
                plt.close(fig)
    if as_frame:
        import pandas as pd

        return pd.DataFrame(rows, columns=columns)
    return rows


def final_columns(rows: list[dict]) -> list[str]:
    """The numeric results of the runs (metrics first, then the smoothed final loss)."""
    skip = {"seconds", "steps", "eval_step", "loss", "lr"}
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            base = k.rsplit("/", 1)[-1]
            if (k not in cols and isinstance(v, (int, float)) and not isinstance(v, bool) and base not in skip
                    and k.upper() != k and not base.endswith("steps")):
                cols.append(k)
    metrics = [c for c in cols if "loss" not in c]
    return metrics + [c for c in cols if "loss" in c]


def _steps_key(keys: list[str], rows: list[dict]) -> str | None:
    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in rows if k in r)]
    for k in numeric:
        if "STEPS" in k.upper() and "TRAIN" in k.upper():
            return k
    steps = [k for k in numeric if "STEPS" in k.upper()]
    return steps[0] if steps else (numeric[0] if numeric else None)


def plot_final(rows: list[dict], folder: Path | None = None, columns: list[str] | None = None):
    """Each final number against the steps (or the first numeric grid value), one line per other grid value."""
    import matplotlib.pyplot as plt

    keys = grid_keys(rows, folder) or [k for k in rows[0] if k.isupper()]
    ok = [r for r in rows if r.get("status") == OK]
    x = _steps_key(keys, ok)
    cols = columns or final_columns(ok)
    if not ok or x is None or not cols:
        return None
    series_keys = [k for k in keys if k != x]
    lr_first = sorted(series_keys, key=lambda k: "LEARNING_RATE" not in k.upper())
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault(tuple(r.get(k) for k in lr_first), []).append(r)
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        for g, rs in groups.items():
            pts = sorted((r[x], r[col]) for r in rs if isinstance(r.get(col), (int, float)) and not math.isnan(r[col]))
            if pts:
                label = ", ".join(f"{k}={_fmt(v)}" for k, v in zip(lr_first, g)) or None
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel(x)
        ax.set_title(col, fontsize=10)
        values = [r[col] for r in ok if isinstance(r.get(col), (int, float))]
        if "loss" not in col and values and all(0 <= v <= 1 for v in values):
            ax.set_ylim(-0.05, 1.05)  # shares and fidelities: the whole range, so small differences look small
        if x.upper().endswith("STEPS") and len({r[x] for r in ok}) > 2:
            ax.set_xscale("log", base=2)
    if len(groups) > 1:
        handles, texts = axes[0][-1].get_legend_handles_labels()
        fig.legend(handles, texts, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.9))
    fig.suptitle("final result of each run", fontsize=11)
    fig.tight_layout()
    return fig


def plot_curves(folder: Path, rows: list[dict] | None = None, smooth: int = 10):
    """Loss (moving average) and every metric of metrics.json against the step, one line (one colour) per run."""
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(folder)
    runs = _run_folders(folder)
    rows = rows or [run_row(p) for p in runs]
    keys = grid_keys(rows, folder)
    curves: dict[str, dict[str, tuple[list, list]]] = {}  # quantity -> label -> (x, y)
    labels: list[str] = []
    for p, r in zip(runs, rows):
        label = ", ".join(f"{k}={_fmt(r.get(k))}" for k in keys) or p.name
        labels.append(label)
        for prefix, f in _json_files(p, "metrics.json").items():
            m = _read_rows(f)
            names = list(dict.fromkeys(k for x in m for k in _numbers(x) if k != "step"))
            for name in names:
                pts = [(x["step"], x[name]) for x in m if "step" in x and name in x]
                if pts:
                    curves.setdefault(f"{prefix}{name}", {})[label] = tuple(map(list, zip(*pts)))
        for prefix, f in _json_files(p, "losses.json").items():
            log = [x for x in _read_rows(f) if "loss" in x]
            if log:
                y = np.asarray([x["loss"] for x in log], dtype=float)
                k = max(1, min(smooth, len(y)))
                avg = np.convolve(y, np.ones(k) / k, mode="valid")
                steps = [x.get("step", i + 1) for i, x in enumerate(log)][k - 1:]
                curves.setdefault(f"{prefix}loss (moving average of {smooth} steps)", {})[label] = (steps, list(avg))
    if not curves:
        return None
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "viridis")
    colour = {lab: cmap(i if len(labels) <= 10 else i / max(1, len(labels) - 1)) for i, lab in enumerate(labels)}
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, (xs, ys) in curves[name].items():
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, label=label, color=colour[label])
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
    handles, texts = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, texts, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.tight_layout()
    return fig


def image_grid(folder: Path, rows: list[dict] | None = None, size: float = 2.4):
    """Each run's final image (its last validation grid), laid out as the grid: columns = the last grid
    parameter's values, rows = the combinations of the others. Failed or missing runs show why."""
    import matplotlib.pyplot as plt
    from PIL import Image

    folder = Path(folder)
    runs = _run_folders(folder)
    rows = rows or [run_row(p) for p in runs]
    keys = grid_keys(rows, folder)
    if not rows:
        return None
    col_key = keys[-1] if keys else None
    row_keys = keys[:-1]
    col_vals = list(dict.fromkeys(r.get(col_key) for r in rows)) if col_key else [None]
    row_vals = list(dict.fromkeys(tuple(r.get(k) for k in row_keys) for r in rows))
    fig, axes = plt.subplots(len(row_vals), len(col_vals), figsize=(size * len(col_vals), size * len(row_vals)),
                             squeeze=False)
    by_cell = {(tuple(r.get(k) for k in row_keys), r.get(col_key) if col_key else None): (p, r)
               for p, r in zip(runs, rows)}
    for i, rv in enumerate(row_vals):
        for j, cv in enumerate(col_vals):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            p, r = by_cell.get((rv, cv), (None, None))
            if r and r.get("image"):
                ax.imshow(Image.open(p / r["image"]).convert("RGB"))
            else:
                ax.text(0.5, 0.5, r.get("status", "not run") if r else "not run", ha="center", va="center",
                        transform=ax.transAxes, color="tab:red")
            if i == 0 and col_key:
                ax.set_title(f"{col_key}={_fmt(cv)}", fontsize=8)
            if j == 0 and row_keys:
                ax.set_ylabel("\n".join(f"{k}={_fmt(v)}" for k, v in zip(row_keys, rv)), fontsize=8)
    fig.suptitle(f"last validation image of each run ({folder.name})", fontsize=10)
    fig.tight_layout()
    return fig


def score(folder: str | Path, fn: Callable[[Path, dict], dict[str, float]], force: bool = False) -> int:
    """Measure each finished run after the fact: fn(run folder, its run.json parameters) -> {metric: value}.

    Written as the run's metrics.json (one row, at the run's last step) when it has none, the format notebooks write
    while training (eval_steps), so collect() and the plots read both alike. Returns how many runs were scored."""
    n = 0
    for p in _run_folders(Path(folder)):
        rec = json.loads((p / "run.json").read_text())
        target = p / "metrics.json"
        if rec.get("status") != OK or (target.exists() and not force):
            continue
        losses = _json_files(p, "losses.json")
        log = _read_rows(next(iter(losses.values()))) if losses else []
        step = log[-1].get("step", len(log)) if log else 0
        target.write_text(json.dumps([{"step": step, **fn(p, rec.get("parameters", {}))}]))
        n += 1
    return n


def markdown(rows: list[dict], columns: list[str] | None = None, digits: int = 4) -> str:
    """A markdown table of some columns of collect()'s rows (for IPython.display.Markdown)."""
    columns = columns or list(rows[0]) if rows else []

    def cell(v):
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
