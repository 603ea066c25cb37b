#!/usr/bin/env python
"""Structured engine (second-order backpropagation) benchmark: issue 11's side-by-side table.

Costs are ratios to one plain-autograd gradient of the same model and loss, measured in
the same process, round-robin (``_timing.bench_interleaved``: every method sampled in
turn, medians), torch on ``--threads`` threads (default 2), OpenBLAS on one:

1. exact diagonal of the MLP 784-128-64-10 tanh CE N=1024 (``nh.examples.mlp()``):
   ``nh.diagonal(op, method="exact", engine="structured")`` vs BackPACK (``extend`` +
   ``DiagHessian``) vs column-by-column autodiff (``P`` products: a few columns timed,
   extrapolated to ``P``). Every method's diagonal is checked against nethessian's.
   Target: ≤ 5 gradients.
2. the same on the small CNN N=256 (``nh.examples.cnn()``). Target: ≤ BackPACK.
3. exact trace (``nh.trace(op, exact=True)``: the structured diagonal, summed) vs
   Hutch++ with 90 products, on both: time, and Hutch++'s RMS relative error against
   the exact value over several seeds. Target: exact faster than Hutch++.
4. dense Hessian of the MLP 64-48-32-10 tanh CE N=512: ``nh.hessian(...,
   engine="structured")`` vs ``engine="autodiff"`` vs ``torch.func.hessian`` of the flat
   parameters, each in a fresh process: time and extra peak RSS (VmHWM reset, as in
   bench_core). Target: ≥ 4× faster than torch.func.hessian at no more memory than autodiff.

Prints a markdown table; writes benchmarks/results/structured.json (structured_quick.json
with ``--quick``) with the date, versions and load averages. About 2–4 minutes on 2 quiet cores.
On a busy machine prefix ``OMP_WAIT_POLICY=PASSIVE`` (torch's spinning OpenMP threads
otherwise slow small kernels 10–100×, see bench_core); the policy is recorded in the JSON.

    .venv/bin/python benchmarks/bench_structured.py             # the issue's sizes
    .venv/bin/python benchmarks/bench_structured.py --quick     # smoke sizes, seconds
    .venv/bin/python benchmarks/bench_structured.py --only diag --only trace
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy/torch: OpenBLAS threads starve torch's

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from _machine import measured_section  # noqa: E402
from _structured_dense import METHODS, dense_problem, dense_worker, run_dense  # noqa: E402
from _structured_runs import HUTCH_MATVECS, run_diagonal, run_trace, workloads  # noqa: E402
from _timing import base_meta, exit_status, finish_meta, flag, fmt_b, fmt_t, make_log, table_head  # noqa: E402
from _timing import write_json, yesno  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = ("diag", "trace", "dense")


def _diag_row(wl, r):
    g, c = r["in_gradients"], r["columns_timed"]
    s, b = g["nethessian structured"], g["BackPACK DiagHessian"]
    target, ok = ("≤ 5 grads", s <= 5) if wl == "MLP" else ("≤ BackPACK", s <= b)
    errs = r["rel_err_vs_nethessian"]
    return (
        wl,
        "exact diagonal",
        f"{fmt_t(r['median_s']['nethessian structured'])} = {s:.2f} grads",
        f"BackPACK {b:.2f} (rel diff {errs['BackPACK DiagHessian']:.0e}); autodiff P={r['P']:,} columns "
        f"{r['autodiff_P_columns_in_gradients_extrapolated']:,.0f} (extrapolated from {c}; rel diff "
        f"{errs['autodiff columns']:.0e}) (grad = {fmt_t(r['median_s']['gradient'])})",
        f"{b / s:.1f}× BackPACK",
        target,
        flag(r, yesno(ok, r["correct"])),
    )


def _trace_row(wl, r):
    g = r["in_gradients"]
    e, h = g["exact trace"], g["Hutch++ 90"]
    return (
        wl,
        f"exact trace ({r['exact_engine']}) vs Hutch++ {HUTCH_MATVECS}",
        f"{fmt_t(r['median_s']['exact trace'])} = {e:.2f} grads",
        f"Hutch++ {h:.1f} grads, RMS rel error {r['hutchpp_rms_rel_error']:.1e} "
        f"over {len(r['hutchpp_rel_errors'])} seeds",
        f"{h / e:.1f}× faster",
        "faster than Hutch++",
        flag(r, yesno(e < h, r["correct"])),
    )


def _dense_row(d):
    s = d["summary"]
    st, ad, fn = s["nh structured"], s["nh autodiff"], s["torch.func.hessian"]
    speed = fn["time_median_s"] / st["time_median_s"]
    ok = speed >= 4 and st["extra_peak_median_bytes"] <= ad["extra_peak_median_bytes"]
    peers = "; ".join(
        f"{m} {fmt_t(v['time_median_s'])} +{fmt_b(v['extra_peak_median_bytes'])}"
        for m, v in s.items()
        if m != "nh structured"
    )
    return (
        "dense MLP",
        "dense Hessian: time, extra peak RSS",
        f"{fmt_t(st['time_median_s'])}, +{fmt_b(st['extra_peak_median_bytes'])}",
        f"{peers} (max-abs rel diff vs autodiff {d['check']['structured_vs_autodiff_maxabs_rel']:.0e})",
        f"{speed:.2f}× torch.func",
        "≥ 4× torch.func, memory ≤ autodiff",
        flag(d, yesno(ok, d["correct"])),
    )


def build_table(res):
    rows = [_diag_row(wl, r) for wl, r in res.get("diag", {}).items()]
    rows += [_trace_row(wl, r) for wl, r in res.get("trace", {}).items()]
    if "dense" in res:
        rows.append(_dense_row(res["dense"]))
    head = ("workload", "measurement", "nethessian", "peers (in gradients unless said)", "ratio", "target", "met?")
    return "\n".join(table_head(head) + ["| " + " | ".join(r) + " |" for r in rows])


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes and few repetitions (seconds)")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/structured[_quick].json)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="S",
        help="before each section wait up to S seconds for other processes to use under 0.3 cores "
        "(default 20, 0 with --quick)",
    )
    ap.add_argument("--dense-worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--worker-save", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _settings(quick):
    if quick:
        return {"reps": 3, "trace_reps": 2, "sample_s": 0.02, "columns": 8, "seeds": 2, "dense_rounds": 1}
    return {"reps": 9, "trace_reps": 5, "sample_s": 0.2, "columns": 64, "seeds": 8, "dense_rounds": 3}


def _run_parts(args, parts, st, section, log):
    res = {}
    wls = workloads(args.quick)
    for part, run in (("diag", run_diagonal), ("trace", run_trace)):
        if part in parts:
            res[part] = {}
            for wl, (desc, build) in wls.items():
                log(f"{part} / {desc}")
                res[part][wl] = section(f"{part}/{wl}", lambda b=build, run=run: run(b, st, log))
    if "dense" in parts:
        log(f"dense / {dense_problem(args.quick)[0]}")
        res["dense"] = section("dense", lambda: run_dense(st["dense_rounds"], args.quick, args.threads, log))
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.dense_worker:
        dense_worker(args.dense_worker, args.quick, args.worker_out, args.worker_save, args.threads)
        return 0
    torch.set_num_threads(args.threads)
    parts = args.only or list(PARTS)
    st = _settings(args.quick)
    wait = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 20.0)
    name = "structured_quick.json" if args.quick else "structured.json"
    out_path = Path(args.out) if args.out else HERE / "results" / name
    t_start = time.perf_counter()
    log = make_log(t_start)
    meta = base_meta(
        quick=args.quick,
        parts=parts,
        settings=st,
        workloads={k: v[0] for k, v in workloads(args.quick).items()},
        dense_workload=dense_problem(args.quick)[0],
    )
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {meta['loadavg_start']}, parts {parts}")
    contention = meta["others_cpu_cores"] = {}
    res = _run_parts(args, parts, st, lambda key, fn: measured_section(key, fn, contention, wait, log), log)
    finish_meta(meta, t_start)
    table = build_table(res)
    print(table)
    write_json(out_path, {"meta": meta, "results": res, "table": table}, log)
    ok = all(r["correct"] for part in ("diag", "trace") for r in res.get(part, {}).values())
    ok = ok and res.get("dense", {}).get("correct", True)
    return exit_status(ok, log, "CORRECTNESS CHECK FAILED: see the rel_err / check fields in the JSON")


if __name__ == "__main__":
    sys.exit(main())
