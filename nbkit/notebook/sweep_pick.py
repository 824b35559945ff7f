"""Sweeps, the pick: which run of a learning-rate x steps sweep is the sweet spot, by one explicit rule that says why,
says when it falls back, and never drops a criterion without saying so.

The rule (RULE; `pick(rows, base)` applies it to collect()'s rows and the base model's scores):

  balance = min(subject fidelity, prompt fidelity kept), where prompt fidelity kept is the run's prompt fidelity as
  a share of the base model's (at most 1): a fine-tune is only as good as the weaker of the two, and the base model
  is the measure of following the prompt. On the toy judge both are shares of pictures and the base model follows
  prompts (prompt fidelity 1.0), so this is min(subject, prompt), the balance of docs/findings.md. With CLIP/DINO
  (SD 1.5) the two are similarities on different scales: the balance is a rule of thumb there, look at the pictures.

  1. the candidates are the runs with the highest balance and those within NEAR (90%) of it;
  2. among them, the runs whose class drift stays at most DRIFT_RISE (0.2) above the base model's; when none does,
     it says so and the drift limit is not met (a DreamBooth run without prior preservation drifts: notebook 02);
  3. the highest balance of those; ties go to fewer steps, then to the lower learning rate.

Fallbacks, each said in the result: a run that is not finished, or lacks a score the others have, is left out and
named; a score no run has is not used, and named (without subject or prompt fidelity there is no pick: pick by eye);
without base-model scores, prompt fidelity is compared with the best run's and drift with the least-drifting run's.
`toy_findings()` gives docs/findings.json's measured toy grid as rows of the same shape, so the rule can be shown on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.notebook.sweep_spec import KIT_ROOT, OK, _fmt, toy_grid

SUBJECT, PROMPT, DRIFT = "subject_fidelity", "prompt_fidelity", "class_drift"
NEAR = 0.9  # candidates: balance at least this share of the best balance
DRIFT_RISE = 0.2  # the drift limit: at most this much above the base model's class drift
FINDINGS_FILE = KIT_ROOT / "docs" / "findings.json"
RULE = ("balance = min(subject fidelity, prompt fidelity as a share of the base model's); among the runs within "
        f"{NEAR:.0%} of the best balance, those with class drift at most {DRIFT_RISE:g} above the base model's; "
        "the highest balance of those, ties to fewer steps, then the lower learning rate")


@dataclass
class SweetSpot:
    """The pick: the chosen row (None: no pick, choose by eye), why in words, and what the rule had to fall back on."""

    row: dict | None
    why: str
    balance: float | None = None
    balances: dict[str, float] = field(default_factory=dict)  # run name -> its balance (the compared runs)
    base_balance: float | None = None  # the base model's balance (None without base-model scores)
    fell_back: list[str] = field(default_factory=list)  # each fallback of the rule, in words
    left_out: dict[str, str] = field(default_factory=dict)  # run name -> why it was not compared
    rule: str = RULE

    def __str__(self) -> str:
        lines = [self.why] + [f"Fallback: {f}" for f in self.fell_back]
        if self.left_out:
            lines.append("Left out of the pick: " + "; ".join(f"{k} ({v})" for k, v in self.left_out.items()) + ".")
        return "\n".join(lines)


def _number(row: dict | None, key: str) -> float | None:
    v = (row or {}).get(key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _key(rows: list[dict], given: str | None, words: tuple[str, ...], avoid: tuple[str, ...] = ()) -> str | None:
    """The grid parameter named `given`, else the first upper-case numeric key holding all `words`."""
    if given:
        return given
    for k in (rows[0] if rows else {}):
        if k.isupper() and all(w in k for w in words) and not any(a in k for a in avoid):
            if _number(rows[0], k) is not None:
                return k
    return None


def _name(row: dict) -> str:
    return str(row.get("run", "?"))


def _names(rows: list[dict]) -> str:
    return ", ".join(_name(r) for r in rows)


def _usable(rows: list[dict], prefix: str, notes: list[str], left_out: dict[str, str]) -> tuple[list[dict], list[str]]:
    """The finished runs that have every score some run has, and the scores the rule can use (each gap said)."""
    ok = []
    for r in rows:
        if r.get("status", OK) == OK:
            ok.append(r)
        else:
            left_out[_name(r)] = f"status {r.get('status')}"
    used = []
    for c in (SUBJECT, PROMPT, DRIFT):
        missing = [r for r in ok if _number(r, prefix + c) is None]
        if ok and len(missing) == len(ok):
            notes.append(f"no finished run has {prefix + c}"
                         + (": the drift limit is not applied." if c == DRIFT else "."))
            continue
        used.append(c)
        for r in missing:
            left_out[_name(r)] = f"no {prefix + c}, which the other runs have"
    return [r for r in ok if _name(r) not in left_out], used


def _label(row: dict, rate_key: str | None, steps_key: str | None) -> str:
    parts = ([f"{rate_key} = {_fmt(row[rate_key])}"] if rate_key in row else []) + (
        [f"{_fmt(row[steps_key])} steps"] if steps_key in row else [])
    return ", ".join(parts) or _name(row)


def _drift_pool(close: list[dict], runs: list[dict], base: dict | None, d: str, drift_rise: float, near: float,
                notes: list[str]) -> tuple[list[dict], str]:
    """The candidates within the drift limit (else all of them, said in `notes`), and how to say the pick's drift."""
    floor, whose = _number(base, d), "base model"
    if floor is None:
        whose = "least-drifting run"
        floor = min(r[d] for r in runs)
        notes.append(f"no base-model {d}: the drift limit is counted from the least-drifting run ({floor:.2f}).")
    limit = floor + drift_rise
    within = [r for r in close if r[d] <= limit + 1e-9]
    if within:
        return within, f"class drift {{drift:.2f}}, within the limit {limit:.2f} ({whose} {floor:.2f} + {drift_rise:g})"
    lo, hi = min(r[d] for r in close), max(r[d] for r in close)
    notes.append(f"no run within {near:.0%} of the best balance keeps class drift at most {drift_rise:g} above the "
                 f"{whose}'s ({floor:.2f}): they drift {lo:.2f}{f' to {hi:.2f}' if hi > lo else ''}, so the pick is "
                 "made without the drift limit (prior preservation, notebook 02, holds drift down).")
    return close, f"class drift {{drift:.2f}}, over the limit {limit:.2f}"


def _no_pick(reason: str, notes: list[str], left_out: dict[str, str], **kw) -> SweetSpot:
    return SweetSpot(None, f"No pick: {reason} Choose by eye in the picture grid: the fewest steps and the lowest "
                           "rate that clearly show your subject.", fell_back=notes, left_out=left_out, **kw)


def pick(rows: list[dict], base: dict | None = None, *, rate_key: str | None = None, steps_key: str | None = None,
         prefix: str = "", near: float = NEAR, drift_rise: float | None = DRIFT_RISE) -> SweetSpot:
    """The sweet spot of a sweep's rows (collect()) by RULE, given the base model's scores (baseline(); None: the
    rule falls back and says so). `rate_key`/`steps_key`: the grid's learning-rate and steps parameters (found by
    name when not given); `prefix`: a subfolder's scores ("with_prior/"); `drift_rise=None`: no drift limit.
    No pick (row None, and why) when no run has both fidelities, or none beats the base model's balance."""
    notes: list[str] = []
    left_out: dict[str, str] = {}
    runs, used = _usable(rows, prefix, notes, left_out)
    if SUBJECT not in used or PROMPT not in used or not runs:
        return _no_pick(" ".join(notes) if notes else "no finished run to compare.", notes, left_out)
    keys = (_key(runs, rate_key, ("LEARNING_RATE",)),
            _key(runs, steps_key, ("STEPS",), ("VALIDATION", "CHECKPOINT", "SAMPLE", "EVAL")))
    s, p, d = prefix + SUBJECT, prefix + PROMPT, prefix + DRIFT
    ref, against = _number(base, p), "the base model's"
    if ref is None or ref <= 0:
        ref, against = max(r[p] for r in runs), "the best run's"
        notes.append(f"no base-model {p}: prompt fidelity is compared with the best run's ({ref:.2f}) instead.")

    def balance(row: dict) -> float:
        return round(min(row[s], min(1.0, row[p] / ref) if ref > 0 else 0.0), 6)

    bal = {_name(r): balance(r) for r in runs}
    base_bal = balance(base) if _number(base, s) is not None and _number(base, p) is not None else None
    if base_bal is not None and max(bal.values()) <= base_bal:
        top = max(runs, key=lambda r: bal[_name(r)])
        return _no_pick(f"no run has a higher balance than the base model's ({base_bal:.2f}; the best run, "
                        f"{_label(top, *keys)}, has {bal[_name(top)]:.2f}): none has learned the subject yet. Train "
                        "longer or at a higher rate.", notes, left_out, balances=bal, base_balance=base_bal)
    close = [r for r in runs if bal[_name(r)] >= near * max(bal.values()) - 1e-9]
    pool, drift_note = close, ""
    if DRIFT in used and drift_rise is not None:
        pool, drift_note = _drift_pool(close, runs, base, d, drift_rise, near, notes)
    elif drift_rise is None:
        notes.append("class drift is not limited (drift_rise=None).")
    chosen = max(pool, key=lambda r: (bal[_name(r)], -(_number(r, keys[1]) or 0), -(_number(r, keys[0]) or 0)))
    why = _explain(chosen, runs, pool, bal, keys, (s, p, d), against, ref, drift_note)
    return SweetSpot(chosen, why, bal[_name(chosen)], bal, base_bal, notes, left_out)


def _explain(chosen: dict, runs: list[dict], pool: list[dict], bal: dict, keys: tuple, names: tuple, against: str,
             ref: float, drift_note: str) -> str:
    """The sentence of a pick: its balance and scores, its drift, a better-balanced run it passed over, its ties."""
    s, p, d = names
    b = bal[_name(chosen)]
    why = (f"Sweet spot: {_label(chosen, *keys)}: balance {b:.2f} (subject fidelity {chosen[s]:.2f}, prompt "
           f"fidelity {chosen[p]:.2f} = {min(1.0, chosen[p] / ref):.0%} of {against})")
    why += f", {drift_note.format(drift=chosen[d])}" if drift_note else ""
    top = max(runs, key=lambda r: bal[_name(r)])
    if bal[_name(top)] > b:
        why += f"; the best balance, {bal[_name(top)]:.2f} at {_label(top, *keys)}, drifts {top[d]:.2f}"
    ties = [r for r in pool if r is not chosen and bal[_name(r)] == b]
    if ties:
        why += f"; tied with {_names(ties)}: fewer steps, then the lower rate, wins"
    return why + "."


def toy_findings(path: str | Path = FINDINGS_FILE) -> dict:
    """docs/findings.json's measured learning-rate x steps grid of the offline model (benchmarks/findings.py) as rows
    like collect()'s, with the toy grid's parameter names: {"rows", "base", "sweet", "seeds"}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: make it with `python -m benchmarks.findings --quick`.")
    m = json.loads(path.read_text())
    rate_key, steps_key = list(toy_grid())
    rows = [{"run": f"findings LR {float(lr):g} x {int(n)}", rate_key: float(lr), steps_key: int(n), "status": OK,
             **{k: v for k, v in cell.items() if k in (SUBJECT, PROMPT, DRIFT, "seconds")}}
            for lr, curve in m["grid"].items() for n, cell in curve.items()]
    return {"rows": rows, "base": m.get("base"), "sweet": tuple(m.get("sweet") or ()), "seeds": m.get("seeds")}
