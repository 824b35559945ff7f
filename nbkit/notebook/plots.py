"""Plots for the notebooks (matplotlib): the loss curve (and its terms), the scores during training (metrics.json),
and side-by-side labelled image rows."""

from __future__ import annotations

import json
from pathlib import Path


def loss_curve(losses: list[float] | str | Path, smooth: int = 10, ax=None, label: str | None = None):
    """Plot per-step loss (thin) and its moving average (thick); `losses` may be a losses.json path."""
    import matplotlib.pyplot as plt
    import numpy as np

    if isinstance(losses, (str, Path)):
        losses = [r["loss"] for r in json.loads(Path(losses).read_text())]
    y = np.asarray(losses, dtype=float)
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    line = ax.plot(np.arange(1, len(y) + 1), y, alpha=0.3, lw=1)[0]
    k = max(1, min(smooth, len(y)))
    avg = np.convolve(y, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(k, len(y) + 1), avg, color=line.get_color(), lw=2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss (diffusion loss is noisy: look at the trend)")
    if label:
        ax.legend()
    return ax


def loss_terms(log: list[dict] | str | Path, terms: tuple[str, ...] = ("instance", "prior"), smooth: int = 10, ax=None):
    """Plot each loss term logged per step (e.g. prior preservation's instance and prior terms) on one axis.

    `log` is the rows of a run's losses.json (or its path); terms a run did not log are skipped."""
    if isinstance(log, (str, Path)):
        log = json.loads(Path(log).read_text())
    ax = ax or loss_curve([r["loss"] for r in log], smooth=smooth, label="total")
    for t in terms:
        if all(t in r for r in log):
            loss_curve([r[t] for r in log], smooth=smooth, ax=ax, label=t)
    return ax


METRIC_LABELS = {"subject_fidelity": "subject fidelity", "prompt_fidelity": "prompt fidelity",
                 "class_drift": "class drift", "tradeoff": "trade-off (harmonic mean)"}


def metric_curves(rows: list[dict] | str | Path, ax=None, title: str | None = None):
    """Plot the scores of a run against the step (rows of metrics.json, or its path, or a run folder) and mark
    the best step (highest trade-off, nbkit.scores.tracking) with a dashed line."""
    import matplotlib.pyplot as plt

    from nbkit.scores.tracking import best_row, read_metrics

    if isinstance(rows, (str, Path)):
        rows = read_metrics(rows)
    if not rows:
        raise ValueError("No scores to plot: the run had eval_steps=0 (set eval_steps to score it while it trains).")
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    steps = [r["step"] for r in rows]
    for key, label in METRIC_LABELS.items():
        if all(key in r for r in rows):
            ax.plot(steps, [r[key] for r in rows], marker="o", ms=3, label=label,
                    lw=2.5 if key == "tradeoff" else 1.5, ls="-" if key != "class_drift" else ":")
    best = best_row(rows)
    if best:
        ax.axvline(best["step"], color="grey", ls="--", lw=1)
        ax.annotate(f"best: step {best['step']}", (best["step"], best["tradeoff"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"score ({rows[-1].get('scorer', 'scorer')})")
    ax.set_title(title or "scores while training (fixed seeds)")
    ax.legend(fontsize=8)
    return ax


def image_rows(rows: dict[str, list], size: float = 1.6, title: str | None = None):
    """A figure with one labelled row of images per key (e.g. 'before' / 'after')."""
    import matplotlib.pyplot as plt

    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n, size * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c])
        axes[r][0].set_title(label, loc="left", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
