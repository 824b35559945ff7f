"""The one prepared GPU check: run it the hour a GPU is lent (one command, <= 8 minutes on one GPU, no hub).

    bash benchmarks/gpu_check.sh                # a CUDA GPU: writes the GPU rows of benchmarks/RESULTS.md
    bash benchmarks/gpu_check.sh --smoke        # anywhere (CI): the same script on the CPU, results to a temp file

What it does, in this order (each part time-boxed, so a slow GPU still leaves a partial table, never nothing):
1. the T4 path's checks (benchmarks/t4_path.py) on CUDA: every method a few steps on the offline model in fp16
   with a GradScaler and 8-bit AdamW (forced to fp16 on a bf16 GPU: the check is the T4's code path), plus the fp16
   take-home reload of one LoRA;
2. benchmarks/bench_memory.py on full-size SD 1.5 (random weights from data/sd15-arch) at 512 px with the 16 GiB cap:
   every method x the 16gb and 8gb presets, then the diffusers-example-style reference loop for DreamBooth;
   each row has the planner's prediction beside the measured peak;
3. the planner's uncalibrated constants fitted from what was measured (printed and written, applied by hand);
4. the rows, with the date, GPU and versions, between the gpu-check markers of benchmarks/RESULTS.md
   (--smoke: a temporary copy), and all figures as JSON under --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
BUDGET_S = 8 * 60  # the whole check; parts still to come when it runs out are listed as skipped
BENCH = [  # (methods, presets, with the reference loop) in the order they run
    ("dreambooth+te+prior", "16gb,8gb", False),
    ("dreambooth", "16gb", True),
    ("lora,ti", "16gb,8gb", False),
    ("dreambooth,dreambooth+te", "8gb", False),
    ("dreambooth+te", "16gb", False),
]


def t4_checks(cuda: bool, work: Path, cases: list[str]) -> list[dict]:
    """benchmarks/t4_path.py's checks; on CUDA each case also records its peak memory."""
    import torch

    from benchmarks import t4_path
    from nbkit.models.offline import SAMPLE_INSTANCE_DIR

    rows, emb = [], None
    over = {"mixed_precision": "fp16"} if cuda else {}
    for case in cases:
        t = time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            f = t4_path.run(case, work, SAMPLE_INSTANCE_DIR, embedding=emb, **over)
            emb = f.result.saved if case == "textual_inversion" else emb
            problems = t4_path.check(f, "T4 (fp16)")
            if case == "lora":
                problems += t4_path.check_export(f, work / "home")
        except Exception as err:  # noqa: BLE001 - the check reports every failure, then goes on
            problems = [f"{type(err).__name__}: {err}"]
        rows.append({"case": case, "ok": not problems, "problems": problems, "seconds": time.perf_counter() - t,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None})
        print(f"t4 check {case:22s} {'ok' if not problems else 'FAILED: ' + '; '.join(problems)}", flush=True)
    return rows


def bench(smoke: bool, out: Path, deadline: float) -> tuple[list[dict], list[str], dict]:
    """bench_memory's rows for BENCH (smoke: one row on the offline model), skipping what the deadline leaves out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    plan = [("dreambooth+te+prior", "cpu", True)] if smoke else BENCH
    rows, skipped, meta = [], [], {}
    for methods, presets, reference in plan:
        if time.time() > deadline:
            skipped.append(f"{methods} x {presets}")
            continue
        argv = ["--methods", methods, "--presets", presets, "--steps", "1" if smoke else "5", "--warmup",
                "0" if smoke else "1", "--out", str(out)] + (["--smoke"] if smoke else []) + \
               ([] if reference else ["--no-reference"])
        result = bm.main(argv)
        rows += result["rows"]
        meta = {k: result[k] for k in ("gpu", "cap_gib", "resolution", "versions")}
    return rows, skipped, meta


def fit_constants(rows: list[dict]) -> dict:
    """The planner's uncalibrated constants, as the measured rows say they should be."""
    ok = [r["nbkit"] for r in rows if r["nbkit"].get("status") == "ok" and r["nbkit"].get("allocated")]
    fit = {}
    if ok and all(n.get("reserved") for n in ok):
        fit["ALLOCATOR_ROUNDING (reserved/allocated - 1, median)"] = round(
            statistics.median(n["reserved"] / n["allocated"] - 1 for n in ok), 3)
    errors = [(r["planner_gib"] - r["nbkit"]["allocated"]) / r["nbkit"]["allocated"] for r in rows
              if r["nbkit"].get("allocated") and r.get("planner_gib")]
    if errors:
        fit["planner error, median / worst (%)"] = (round(100 * statistics.median(errors), 1),
                                                    round(100 * max(errors, key=abs), 1))
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            fit["CUDA_CONTEXT (GiB outside torch's allocator)"] = round(
                (total - free - torch.cuda.memory_reserved()) / 2**30, 2)
    except Exception:  # noqa: BLE001
        pass
    return fit


def markdown(when: str, meta: dict, t4: list[dict], rows: list[dict], skipped: list[str], fit: dict) -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    versions = " · ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    lines = [BEGIN, f"### GPU check {when} · {meta.get('gpu', '?')} · {versions}", "",
             "T4 path on this GPU (benchmarks/t4_path.py, offline model, fp16 + GradScaler + 8-bit AdamW):", "",
             "| case | result | seconds | peak GiB |", "|---|---|---|---|"]
    for r in t4:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['case']} | {'ok' if r['ok'] else 'FAILED: ' + '; '.join(r['problems'])} | "
                     f"{r['seconds']:.1f} | {peak} |")
    what = "Full-size SD 1.5" if meta.get("cap_gib") else "Smoke run: the offline model on the CPU"
    lines += ["", f"{what}, {meta.get('resolution', '?')} px, cap {meta.get('cap_gib')} GiB:", "",
              bm.table(rows) if rows else "(no rows)", ""]
    if skipped:
        lines.append("Skipped (time budget): " + ", ".join(skipped) + "\n")
    lines += ["Planner constants as measured (apply by hand in nbkit/planner.py): "
              + (", ".join(f"{k} = {v}" for k, v in fit.items()) or "none"), END]
    return "\n".join(lines)


def write_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="on the CPU: the T4 rehearsal and one offline bench row")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--results", default=None, help="the markdown file to write the rows into "
                                                    "(default benchmarks/RESULTS.md; --smoke: a temporary copy)")
    args = ap.parse_args(argv)
    import torch

    start, cuda = time.time(), torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        ap.error("no CUDA GPU here: run with --smoke (the CPU rehearsal), or on a GPU")
    if not cuda:
        os.environ["NBKIT_T4_REHEARSAL"] = "1"
    from benchmarks import t4_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t4 = t4_checks(cuda, work, ["lora"] if args.smoke else list(t4_path.CASES))
    os.environ.pop("NBKIT_T4_REHEARSAL", None)  # the bench tunes and measures as a GPU run (CPU smoke: fp32)
    rows, skipped, meta = bench(args.smoke, out, start + BUDGET_S)
    fit = fit_constants(rows)
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = markdown(when, meta, t4, rows, skipped, fit)
    results = Path(args.results) if args.results else (
        Path(tempfile.mkdtemp()) / "RESULTS.md" if args.smoke else ROOT / "benchmarks" / "RESULTS.md")
    write_results(results, section)
    summary = {"date": when, "meta": meta, "t4": t4, "rows": rows, "skipped": skipped, "fit": fit,
               "seconds": time.time() - start, "results": str(results)}
    (out / f"gpu_check-{'smoke' if args.smoke else 'gpu'}.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n" + section + f"\n\ngpu check: {time.time() - start:.0f} s; rows in {results}")
    return summary


if __name__ == "__main__":
    main()
