"""Sweeps: run a notebook over a grid of parameters with papermill, resumably, and collect the results.

A sweep is a small YAML file:

    notebook: notebooks/01_dreambooth.ipynb     # any notebook with a `parameters` cell and OUTPUT_DIR
    output: outputs/sweeps/lr_steps             # one folder per run is made under output/runs/
    fixed: {MODEL: offline, SMOKE: false}       # the same in every run
    grid:                                       # every combination is one run
      LEARNING_RATE: [1e-6, 2e-6, 5e-6]
      MAX_TRAIN_STEPS: [200, 400, 800]
    cleanup: [checkpoints]                      # optional: deleted from a run's folder once it finished

    python -m nbkit.sweep configs/sweeps/objects_lr_steps.yaml            # run (finished runs are skipped)
    python -m nbkit.sweep configs/sweeps/objects_lr_steps.yaml --dry-run  # list the runs and their status
    python -m nbkit.sweep configs/sweeps/objects_lr_steps.yaml --set SMOKE=true --output /tmp/try
    python -m nbkit.sweep collect outputs/sweeps/lr_steps                 # table and plots again, nothing run

Each run is one papermill execution with OUTPUT_DIR set to its own folder, named from its grid values
(`LEARNING_RATE-2e-06__MAX_TRAIN_STEPS-400`), which holds the executed notebook, everything the notebook wrote
and `run.json` (parameters, status, seconds, the error if it failed). Run the same sweep again after an
interruption or a failure: finished runs (status "ok") are skipped, the others run again in their folder (where
the course notebooks continue from their last checkpoint, RESUME=auto). A failed run does not stop the sweep;
failures are listed at the end (and the command exits non-zero).

`collect` writes `results.csv` (one row per run: parameters, status, seconds, the last row of losses.json, the
final row of metrics.json when the notebook wrote one) and three figures: `final.png` (each final number against
the steps, one line per learning rate or other grid value), `curves.png` (loss and metric curves of every run)
and `images.png` (each run's last validation grid, laid out as the grid). From a notebook:
`nbkit.sweep.run(spec)` and `nbkit.sweep.collect(folder)` (a list of dicts; `as_frame=True` for pandas).
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

KIT_ROOT = Path(__file__).resolve().parent.parent
SPEC_KEYS = {"notebook", "output", "fixed", "grid", "cleanup", "kernel"}
RESERVED = "OUTPUT_DIR"  # set by the sweep: each run's own folder
OK, FAILED, RUNNING, INTERRUPTED = "ok", "failed", "running", "interrupted"


class SweepError(ValueError):
    """The sweep file or its parameters are wrong; the message says what to do."""


class SweepFailed(SweepError):
    """Some runs of the sweep failed (the others ran); the message lists them."""


# ---------------------------------------------------------------- the spec
class _Loader(yaml.SafeLoader):
    """YAML with 1e-6 read as a number (plain YAML 1.1 reads it as text: learning rates are written that way)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A value written as YAML (`true`, `2e-6`, `[1, 2]`, `offline`)."""
    return yaml.load(text, Loader=_Loader)


@dataclass
class Spec:
    """A sweep: which notebook, where, the parameters every run shares and the grid of those that vary."""

    notebook: Path
    output: Path
    grid: dict[str, list]
    fixed: dict[str, Any] = field(default_factory=dict)
    cleanup: list[str] = field(default_factory=list)  # paths (globs) deleted from a run's folder once it is ok
    kernel: str | None = None  # Jupyter kernel name (None: the notebook's own)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, in the order the file lists them."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    def runs(self) -> list[Run]:
        return [Run(self, p) for p in self.points()]

    def to_dict(self) -> dict:
        return {"notebook": str(self.notebook), "output": str(self.output), "fixed": self.fixed, "grid": self.grid,
                "cleanup": self.cleanup, "kernel": self.kernel}


def _resolve_notebook(name: str, base: Path | None) -> Path:
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([base / p] if base else []) + [KIT_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SweepError(f"notebook {name!r} not found (looked in {', '.join(str(c.parent) for c in candidates)}): "
                     "give its path relative to where you run the sweep, e.g. notebooks/01_dreambooth.ipynb.")


def load_spec(spec: str | Path | dict | Spec, output: str | Path | None = None,
              overrides: dict[str, Any] | None = None, check: bool = True) -> Spec:
    """A checked Spec from a YAML file, a dict with the same keys, or a Spec.

    `output` replaces the file's output folder; `overrides` are extra fixed parameters (e.g. {"SMOKE": True}).
    With `check`, the notebook's parameters are read (papermill.inspect_notebook) and a name it does not have,
    or a value of the wrong type, is refused before anything runs.
    """
    base = None
    if isinstance(spec, Spec):
        data = spec.to_dict()
    elif isinstance(spec, dict):
        data = dict(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise SweepError(f"sweep file {str(path)!r} does not exist (examples: configs/sweeps/*.yaml).")
        try:
            data = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as err:
            raise SweepError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise SweepError(f"{path}: expected a mapping with notebook, output, fixed and grid; got "
                             f"{type(data).__name__}.")
        base = path.parent
        data.setdefault("output", str(Path("outputs") / "sweeps" / path.stem))
    where = f"{spec}" if base else "sweep"
    e: list[str] = []
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        e.append(f"unknown keys {unknown}: a sweep has {', '.join(sorted(SPEC_KEYS))}.")
    for key in ("notebook", "output", "grid"):
        if not data.get(key):
            e.append(f"{key} is missing." + (" It maps each varying parameter to a list of values, e.g. "
                                              "{LEARNING_RATE: [1e-6, 2e-6]}." if key == "grid" else ""))
    grid, fixed = data.get("grid") or {}, data.get("fixed") or {}
    if not isinstance(grid, dict):
        e.append(f"grid must map parameter names to lists of values, not {type(grid).__name__}.")
        grid = {}
    if not isinstance(fixed, dict):
        e.append(f"fixed must map parameter names to values, not {type(fixed).__name__}.")
        fixed = {}
    fixed = {**fixed, **(overrides or {})}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            e.append(f"grid.{k}: give a non-empty list of values, e.g. [{v!r}]" +
                     (" (a single value belongs in fixed)." if not isinstance(v, list) else "."))
        elif len({json.dumps(x, sort_keys=True, default=str) for x in v}) != len(v):
            e.append(f"grid.{k}: a value is listed twice: {v}.")
    both = sorted(set(grid) & set(fixed))
    if both:
        e.append(f"{both} are both in fixed and in grid: keep each parameter in one of them.")
    if RESERVED in grid or RESERVED in fixed:
        e.append(f"{RESERVED} is set by the sweep (each run writes to its own folder under output): remove it.")
    cleanup = data.get("cleanup") or []
    if not isinstance(cleanup, list) or not all(isinstance(c, str) and c and not c.startswith(("/", "..")) for c in cleanup):
        e.append("cleanup: a list of paths inside a run's folder, e.g. [checkpoints].")
        cleanup = []
    if e:
        raise SweepError(f"{where}: these need fixing:\n  - " + "\n  - ".join(e))
    out = Path(output if output is not None else data["output"]).expanduser()
    s = Spec(_resolve_notebook(str(data["notebook"]), base), out.resolve(), dict(grid), fixed, cleanup,
             data.get("kernel"))
    if check:
        check_parameters(s)
    return s


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The notebook's parameters and their default values (papermill.inspect_notebook)."""
    import papermill as pm

    found = pm.inspect_notebook(str(notebook))
    if not found:
        raise SweepError(f"{notebook}: no cell tagged 'parameters', so papermill cannot set anything in it.")
    defaults = {}
    for name, p in found.items():
        try:
            defaults[name] = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            defaults[name] = p["default"]
    return defaults


def _type_problem(name: str, value: Any, default: Any) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{name}={value!r}: expected true or false."
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else f"{name}={value!r}: expected a whole number."
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{name}={value!r}: expected a number (write 2e-6 or 0.000002)."
    if isinstance(default, str):
        return None if isinstance(value, str) else f"{name}={value!r}: expected text (quote it: \"{value}\")."
    return None


def check_parameters(spec: Spec) -> dict[str, Any]:
    """Refuse parameters the notebook does not have (or of the wrong type) before anything runs."""
    defaults = notebook_parameters(spec.notebook)
    if RESERVED not in defaults:
        raise SweepError(f"{spec.notebook.name} has no {RESERVED} parameter: a sweep gives each run its own "
                         "output folder through it. Add one to its parameters cell.")
    unknown = sorted((set(spec.fixed) | set(spec.grid)) - set(defaults))
    e = []
    if unknown:
        e.append(f"{spec.notebook.name} has no parameter {', '.join(unknown)}. Its parameters are: "
                 f"{', '.join(sorted(defaults))}.")
    for name, values in [(k, [v]) for k, v in spec.fixed.items()] + list(spec.grid.items()):
        for v in values:
            problem = name in defaults and _type_problem(name, v, defaults[name])
            if problem:
                e.append(problem)
    if e:
        raise SweepError(f"{spec.notebook.name}: nothing was run, these need fixing:\n  - " + "\n  - ".join(e))
    return defaults


# ---------------------------------------------------------------- one run
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def run_name(point: dict[str, Any]) -> str:
    """A stable folder name for a grid point: `LEARNING_RATE-2e-06__MAX_TRAIN_STEPS-400`."""
    name = "__".join(f"{k}-{_fmt(v)}" for k, v in point.items())
    name = re.sub(r"[^A-Za-z0-9.+_=-]+", "_", name).strip("._") or "run"
    if len(name) > 120:  # keep paths usable; the hash keeps it unique and stable
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


@dataclass
class Run:
    """One grid point of a sweep: its folder, its parameters, its status."""

    spec: Spec
    point: dict[str, Any]

    @property
    def name(self) -> str:
        return run_name(self.point)

    @property
    def folder(self) -> Path:
        return self.spec.output / "runs" / self.name

    @property
    def parameters(self) -> dict[str, Any]:
        """What papermill sets (OUTPUT_DIR, this run's folder, is added at execution)."""
        return {**self.spec.fixed, **self.point}

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.point.items())

    def record(self) -> dict | None:
        p = self.folder / "run.json"
        return json.loads(p.read_text()) if p.is_file() else None

    @property
    def status(self) -> str:
        """"ok", "failed", "interrupted", "running" (or a run killed hard), or "todo"."""
        rec = self.record()
        return rec.get("status", "todo") if rec else "todo"


def _write_record(run: Run, **fields) -> dict:
    rec = {"name": run.name, "notebook": str(run.spec.notebook), "point": run.point, "parameters": run.parameters}
    old = run.record() or {}
    rec["attempts"] = old.get("attempts", 0)
    rec.update(fields)
    run.folder.mkdir(parents=True, exist_ok=True)
    tmp = run.folder / "run.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2, default=str))
    tmp.replace(run.folder / "run.json")
    return rec


def _execute_notebook(notebook: Path, executed: Path, parameters: dict, cwd: Path, kernel: str | None) -> None:
    """One papermill execution (kept apart so tests can count executions)."""
    import papermill as pm

    pm.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(cwd), progress_bar=False,
                        kernel_name=kernel)


def _error_text(err: BaseException) -> str:
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename:  # papermill.PapermillExecutionError: the exception raised inside the notebook
        return f"{ename}: {evalue} (cell {getattr(err, 'exec_count', '?')})"
    return f"{type(err).__name__}: {err}"


def execute(run: Run, cwd: Path | None = None) -> dict:
    """Run one grid point now (whatever its status); return its run.json record. KeyboardInterrupt is re-raised."""
    run.folder.mkdir(parents=True, exist_ok=True)
    attempts = (run.record() or {}).get("attempts", 0) + 1
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_record(run, status=RUNNING, started=started, attempts=attempts, seconds=None, error=None)
    executed = run.folder / run.spec.notebook.name
    params = {**run.parameters, RESERVED: str(run.folder)}
    try:
        _execute_notebook(run.spec.notebook, executed, params, Path(cwd or Path.cwd()), run.spec.kernel)
    except KeyboardInterrupt:
        _write_record(run, status=INTERRUPTED, started=started, seconds=round(time.perf_counter() - t0, 2),
                      error="interrupted (KeyboardInterrupt): run the sweep again to continue")
        raise
    except Exception as err:  # noqa: BLE001 - any failure of one run is recorded; the sweep goes on
        return _write_record(run, status=FAILED, started=started, seconds=round(time.perf_counter() - t0, 2),
                             error=_error_text(err), executed=str(executed))
    for pattern in run.spec.cleanup:
        for p in run.folder.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return _write_record(run, status=OK, started=started, seconds=round(time.perf_counter() - t0, 2), error=None,
                         executed=str(executed))


# ---------------------------------------------------------------- the sweep
@dataclass
class Report:
    """What one `run` did: the runs executed, skipped (already ok) and failed, and the collected rows."""

    output: Path
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]  # name -> error
    rows: list[dict]

    def __str__(self) -> str:
        lines = [f"sweep in {self.output}: {len(self.ran)} run, {len(self.skipped)} already done, "
                 f"{len(self.failed)} failed"]
        lines += [f"  FAILED {name}: {err}  (see {self.output / 'runs' / name})" for name, err in self.failed.items()]
        return "\n".join(lines)


def _check_existing(spec: Spec) -> None:
    """A run folder made with other fixed parameters would mix two sweeps: refuse before running anything."""
    for r in spec.runs():
        rec = r.record()
        if rec and json.loads(json.dumps(rec.get("parameters"), default=str)) != json.loads(
                json.dumps(r.parameters, default=str)):
            old, new = rec.get("parameters", {}), r.parameters
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            raise SweepError(f"{r.folder} was run with other parameters ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in sorted(diff.items()))}). "
                             "Use another output folder for the new sweep, or delete that run folder to redo it.")


def plan(spec: Spec) -> list[tuple[Run, str]]:
    """Every run with its status: what `run` would do (ok runs are skipped)."""
    return [(r, r.status) for r in spec.runs()]


def run(spec: str | Path | dict | Spec, output: str | Path | None = None, overrides: dict | None = None,
        check: bool = True, progress: bool = True, cwd: str | Path | None = None) -> Report:
    """Run every grid point not finished yet (in order), then collect. Returns a Report.

    A failed run is recorded and the sweep goes on; with `check` (the default) a SweepError listing the failures is
    raised at the end, after collecting (SweepFailed). Interrupt it (Ctrl-C, a lost runtime) and call it again: finished runs are
    skipped, the interrupted one runs again in its folder.
    """
    from tqdm.auto import tqdm

    s = load_spec(spec, output, overrides)
    _check_existing(s)
    s.output.mkdir(parents=True, exist_ok=True)
    (s.output / "sweep.json").write_text(json.dumps(s.to_dict(), indent=2, default=str))
    runs = s.runs()
    ran, skipped, failed = [], [], {}
    bar = tqdm(runs, desc=f"sweep {s.output.name}", unit="run", disable=not progress)
    for r in bar:
        if r.status == OK:
            skipped.append(r.name)
            continue
        bar.set_postfix_str(r.label)
        rec = execute(r, Path(cwd) if cwd else None)
        ran.append(r.name)
        msg = f"{r.label}: {rec['status']} in {rec['seconds']:.0f} s"
        if rec["status"] != OK:
            failed[r.name] = rec["error"]
            msg += f" - {rec['error']}"
        (bar.write if progress else print)(msg)
    bar.close()
    report = Report(s.output, ran, skipped, failed, collect(s.output))
    print(report)
    if failed and check:
        raise SweepFailed(str(report))
    return report


# ---------------------------------------------------------------- collect
_SKIP_DIRS = {"checkpoints", "model", "class_images"}


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


def final_image(folder: str | Path) -> Path | None:
    """A run's last validation grid (validation/step_*.png), else its last sample image, else None."""
    folder = Path(folder)
    for pattern in ("validation/step_*.png", "*/validation/step_*.png", "samples/after_*.png", "samples/*.png", "*.png"):
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


# ---------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbkit.sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the sweep (finished runs are skipped), then collect")
    r.add_argument("spec", help="the sweep's YAML file")
    r.add_argument("--output", help="output folder (default: the file's `output`)")
    r.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra fixed parameter, e.g. --set SMOKE=true (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    c = sub.add_parser("collect", help="write results.csv and the plots of a sweep folder again; run nothing")
    c.add_argument("folder")
    c.add_argument("--no-plots", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "collect", "-h", "--help"):
        argv.insert(0, "run")  # `python -m nbkit.sweep file.yaml` runs it
    args = _parser().parse_args(argv)
    try:
        if args.command == "collect":
            rows = collect(args.folder, plots=not args.no_plots)
            folder = Path(args.folder)
            print(markdown(rows, ["run", "status", "seconds"] + final_columns(rows)))
            print(f"wrote {folder / 'results.csv'}" + ("" if args.no_plots else " and final.png, curves.png, images.png"))
            return 0
        overrides = {}
        for item in args.set:
            if "=" not in item:
                raise SweepError(f"--set {item!r}: write NAME=VALUE, e.g. --set SMOKE=true.")
            k, v = item.split("=", 1)
            overrides[k.strip()] = parse_value(v)
        if args.dry_run:
            s = load_spec(args.spec, args.output, overrides)
            _check_existing(s)
            todo = 0
            for r, status in plan(s):
                todo += status != OK
                print(f"{'skip' if status == OK else 'RUN ':4}  {status:11}  {r.folder}")
            print(f"{len(s.points())} runs of {s.notebook.name}, {todo} to run; fixed: {s.fixed}")
            return 0
        run(args.spec, args.output, overrides)
        return 0
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1 if isinstance(err, SweepFailed) else 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue (finished runs are skipped).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
