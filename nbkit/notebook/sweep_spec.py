"""Sweeps, the grid spec: the YAML file read and checked (against the notebook's own parameters), its runs.

A Spec is a notebook, an output folder, the parameters every run shares (fixed) and the grid of those that vary;
each combination is a Run, with its own folder under output/runs/ and its status in that folder's run.json. Running
them is nbkit.notebook.sweep, collecting their results nbkit.notebook.sweep_results (both import this; it imports
neither).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nbkit.paths import ROOT

KIT_ROOT = ROOT  # notebooks named relative to the kit's folder are found from anywhere
SPEC_KEYS = {"notebook", "output", "fixed", "grid", "cleanup", "kernel"}
RESERVED = "OUTPUT_DIR"  # set by the sweep: each run's own folder
TOY_GRID_FILE = KIT_ROOT / "configs" / "sweeps" / "toy_lr_steps.yaml"  # the offline model's one grid (see toy_grid)
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


def _read_spec(spec: str | Path | dict | Spec) -> tuple[dict, Path | None]:
    """The sweep's keys as a dict, and the folder of its YAML file (None for a dict or a Spec)."""
    if isinstance(spec, Spec):
        return spec.to_dict(), None
    if isinstance(spec, dict):
        return dict(spec), None
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
    data.setdefault("output", str(Path("outputs") / "sweeps" / path.stem))
    return data, path.parent


def _spec_problems(data: dict, overrides: dict[str, Any] | None) -> tuple[list[str], dict, dict, list]:
    """What is wrong with the sweep's keys, and its grid, fixed parameters (with the overrides) and cleanup."""
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
    if not isinstance(cleanup, list) or not all(isinstance(c, str) and c and not c.startswith(("/", ".."))
                                                for c in cleanup):
        e.append("cleanup: a list of paths inside a run's folder, e.g. [checkpoints].")
        cleanup = []
    return e, grid, fixed, cleanup


def load_spec(spec: str | Path | dict | Spec, output: str | Path | None = None,
              overrides: dict[str, Any] | None = None, check: bool = True) -> Spec:
    """A checked Spec from a YAML file, a dict with the same keys, or a Spec.

    `output` replaces the file's output folder; `overrides` are extra fixed parameters (e.g. {"SMOKE": True}).
    With `check`, the notebook's parameters are read (papermill.inspect_notebook) and a name it does not have,
    or a value of the wrong type, is refused before anything runs.
    """
    data, base = _read_spec(spec)
    where = f"{spec}" if base else "sweep"
    e, grid, fixed, cleanup = _spec_problems(data, overrides)
    if e:
        raise SweepError(f"{where}: these need fixing:\n  - " + "\n  - ".join(e))
    out = Path(output if output is not None else data["output"]).expanduser()
    s = Spec(_resolve_notebook(str(data["notebook"]), base), out.resolve(), dict(grid), fixed, cleanup,
             data.get("kernel"))
    if check:
        check_parameters(s)
    return s


def toy_grid() -> dict[str, list]:
    """The offline model's learning-rate x steps grid, {parameter of notebook 01: values}, from
    configs/sweeps/toy_lr_steps.yaml: the one grid that notebook 07 runs offline and benchmarks/findings.py measures
    (`--quick`, docs/findings.json), so 07 can quote the findings' numbers for the grid its learner runs."""
    return {k: list(v) for k, v in load_spec(TOY_GRID_FILE, check=False).grid.items()}


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
        return (None if isinstance(value, int) and not isinstance(value, bool)
                else f"{name}={value!r}: expected a whole number.")
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
