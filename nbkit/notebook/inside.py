"""A look inside the one training loop: nbkit's own lines that compute a training step's loss, as a notebook shows
them (notebook 01 the whole step, notebook 02 the prior-preservation term). The lines are read from the loop's
source at call time, so what the learner reads is what trains.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from nbkit.paths import ROOT

PARTS = ("step", "prior")


def step_source(part: str = "step") -> str:
    """nbkit's source of one training step's loss (`nbkit.training.loop`), numbered as in its file.

    part="step": the whole function (noise, timestep, noisy latents, prediction, loss); "prior": only the lines that
    split the batch into your pictures and the class pictures and add the weighted prior term.
    """
    if part not in PARTS:
        raise ValueError(f"part={part!r}: choose one of {', '.join(PARTS)}.")
    from nbkit.training import loop

    fn = loop._loss
    lines, first = inspect.getsourcelines(fn)
    numbered = list(enumerate(lines, first))
    if part == "prior":
        start = next(i for i, (_, line) in enumerate(numbered) if line.strip().startswith("if b.prior"))
        end = next(i for i in range(start + 1, len(numbered))
                   if numbered[i][1].strip() and not numbered[i][1].startswith(" " * 8))
        numbered = numbered[start:end]
    file = Path(inspect.getsourcefile(fn)).resolve()
    where = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file
    head = f"{where.as_posix()}, {fn.__name__}(), lines {numbered[0][0]}-{numbered[-1][0]}:"
    return "\n".join([head] + [f"{n:4d} | {line.rstrip()}" for n, line in numbered])
