"""Sweeps: run a notebook over a grid of parameters with papermill, resumably, and collect the results.

A sweep is a small YAML file:

    notebook: notebooks/01_dreambooth.ipynb     # any notebook with a `parameters` cell and OUTPUT_DIR
    output: outputs/sweeps/lr_steps             # one folder per run is made under output/runs/
    fixed: {MODEL: offline, SMOKE: false}       # the same in every run
    grid:                                       # every combination is one run
      LEARNING_RATE: [1e-6, 2e-6, 5e-6]
      MAX_TRAIN_STEPS: [200, 400, 800]
    cleanup: [checkpoints]                      # optional: deleted from a run's folder once it finished

    python -m nbkit sweep configs/sweeps/objects_lr_steps.yaml            # run (finished runs are skipped)
    python -m nbkit sweep configs/sweeps/objects_lr_steps.yaml --dry-run  # list the runs and their status
    python -m nbkit sweep configs/sweeps/objects_lr_steps.yaml --set SMOKE=true --output /tmp/try
    python -m nbkit sweep collect outputs/sweeps/lr_steps                 # table and plots again, nothing run

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
`nbkit.notebook.sweep.run(spec)` and `nbkit.notebook.sweep.collect(folder)` (a list of dicts; `as_frame=True` for \
pandas). The base model's scores are step 0 of the runs' own metrics (sweep_results.baseline), and the sweet spot is
picked by the written rule of nbkit.notebook.sweep_pick, which says why and when it fell back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# the public names of the grid spec and the results, importable from here too (python -m nbkit sweep's module)
from nbkit.notebook.sweep_pick import SUBJECT, pick
from nbkit.notebook.sweep_results import baseline, collect, final_columns, markdown, plot_final, score  # noqa: F401
from nbkit.notebook.sweep_spec import (  # noqa: F401
    FAILED,
    INTERRUPTED,
    OK,
    RESERVED,
    RUNNING,
    Run,
    Spec,
    SweepError,
    SweepFailed,
    load_spec,
    notebook_parameters,
    parse_value,
    run_name,
)


# ---------------------------------------------------------------- one run
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
            raise SweepError(f"{r.folder} was run with other parameters "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in sorted(diff.items()))}). "
                             "Use another output folder for the new sweep, or delete that run folder to redo it.")


def plan(spec: Spec) -> list[tuple[Run, str]]:
    """Every run with its status: what `run` would do (ok runs are skipped)."""
    return [(r, r.status) for r in spec.runs()]


def run(spec: str | Path | dict | Spec, output: str | Path | None = None, overrides: dict | None = None,
        check: bool = True, progress: bool = True, cwd: str | Path | None = None) -> Report:
    """Run every grid point not finished yet (in order), then collect. Returns a Report.

    A failed run is recorded and the sweep goes on; with `check` (the default) a SweepError listing the failures is
    raised at the end, after collecting (SweepFailed). Interrupt it (Ctrl-C, a lost runtime) and call it again:
    finished runs are skipped, the interrupted one runs again in its folder.
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


# ---------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nbkit sweep", description=__doc__.split("\n\n")[0],
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
        argv.insert(0, "run")  # `python -m nbkit sweep file.yaml` runs it
    args = _parser().parse_args(argv)
    try:
        if args.command == "collect":
            rows = collect(args.folder, plots=not args.no_plots)
            folder = Path(args.folder)
            print(markdown(rows, ["run", "status", "seconds"] + final_columns(rows)))
            if any(SUBJECT in r for r in rows):  # scored runs: the sweet spot by the kit's rule, and why
                print(pick(rows, baseline(folder)))
            print(f"wrote {folder / 'results.csv'}"
                  + ("" if args.no_plots else " and final.png, curves.png, images.png"))
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
