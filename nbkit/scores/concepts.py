"""Scores of a run with several subjects (TrainConfig.concepts_list): each subject scored on its own, as a run of
its own would be (its evaluator from nbkit.scores.evaluate.for_run: the toy judge offline, CLIP + DINO on SD 1.5),
and their mean, so the best model and the overfit warning (nbkit.scores.tracking) weigh every subject alike.

A row of metrics.json then holds the means under the usual names (subject_fidelity, prompt_fidelity, class_drift,
tradeoff, ...) and each subject's own numbers as "<identifier>/<name>" ("zwx/subject_fidelity"); `per_concept(row)`
splits them out again:

    per_concept(result.metrics[-1])  # {"zwx": {"subject_fidelity": 0.88, ...}, "qlo": {...}}
"""

from __future__ import annotations

from dataclasses import dataclass

from nbkit.scores import evaluate

SEP = "/"


@dataclass
class Combined:
    """One evaluator per subject; `score` draws and scores each subject's pictures and reports them and their mean."""

    evaluators: dict[str, evaluate.Evaluator]  # identifier -> its evaluator

    @property
    def name(self) -> str:
        names = sorted({e.name for e in self.evaluators.values()})
        return " + ".join(names)

    @property
    def why(self) -> str:
        return f"each of the {len(self.evaluators)} subjects ({', '.join(self.evaluators)}) is scored on its own"

    def score(self, pipe_or_images) -> dict[str, float]:
        """Each subject's scores ("<identifier>/<name>") and, under the plain names, their mean over the subjects.
        `pipe_or_images`: a pipeline, or {identifier: pictures as Evaluator.draw returns them}."""
        each = {word: ev.score(pipe_or_images[word] if isinstance(pipe_or_images, dict) else pipe_or_images)
                for word, ev in self.evaluators.items()}
        common = [k for k in next(iter(each.values())) if all(k in s for s in each.values())]
        out = {k: sum(s[k] for s in each.values()) / len(each) for k in common}
        for word, s in each.items():
            out.update({f"{word}{SEP}{k}": v for k, v in s.items()})
        return out


def per_concept(row: dict) -> dict[str, dict[str, float]]:
    """A metrics row's scores of each subject: {identifier: {"subject_fidelity": ..., ...}} ({} with one subject)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if SEP in key:
            word, name = key.split(SEP, 1)
            out.setdefault(word, {})[name] = value
    return out


def table(row: dict) -> str:
    """Each subject's scores in a row of metrics.json, as text: one line per subject."""
    cols = (("subject_fidelity", "subject"), ("prompt_fidelity", "prompt"), ("class_drift", "class drift"),
            ("tradeoff", "balance"))
    lines = ["subject    | " + " | ".join(name.rjust(11) for _, name in cols)]
    for word, s in per_concept(row).items():
        lines.append(f"{word:10s} | " + " | ".join(f"{s.get(k, float('nan')):11.2f}" for k, _ in cols))
    return "\n".join(lines)
