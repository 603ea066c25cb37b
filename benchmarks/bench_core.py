#!/usr/bin/env python
"""Core nethessian benchmark: HVP cost, 32-column products, and the dense Hessian.

Everything is measured side by side, in the same process (the dense Hessian in
fresh subprocesses, one per method, for its peak memory), and reported as
ratios to one plain-autograd gradient of the same model and loss, because these
machines are shared and noisy. See benchmarks/README.md.

    .venv/bin/python benchmarks/bench_core.py            # full run (~5-10 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --quick    # smoke test
    .venv/bin/python benchmarks/bench_core.py --only hvp --only batch
"""

from __future__ import annotations

import os
import sys
import time

from _machine import cpu_snapshot, measured_section, others_load

# numpy/scipy OpenBLAS threads starve torch's on these small machines (FACTS.md):
# pin them to one thread before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# On a shared machine torch's OpenMP threads spin at every barrier while a sibling thread
# is descheduled: small kernels then run 10-100x slower (measured: one W2 HVP 0.5 ms ->
# 250-500 ms under a load of 2 other cores). Passive waiting (threads sleep) removes that,
# but on an idle machine it makes small kernels slower (W2 gradient ~0.3 -> ~1.1 ms).
# --omp-wait auto (default): passive only if other processes are busy when we start.
# It must be decided before torch is imported.
def _resolve_omp_wait(argv):
    import argparse as _ap

    pre = _ap.ArgumentParser(add_help=False)
    pre.add_argument("--omp-wait", choices=["auto", "default", "passive"], default="auto")
    pre.add_argument("--dense-worker")
    choice = pre.parse_known_args(argv)[0].omp_wait
    probe = None
    if "OMP_WAIT_POLICY" in os.environ:
        return f"env:{os.environ['OMP_WAIT_POLICY']}", probe
    if choice == "auto":
        a = cpu_snapshot()
        time.sleep(2.0)
        probe = others_load(a, cpu_snapshot())
        choice = "passive" if probe > 0.3 else "default"
    if choice == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return choice, probe


OMP_WAIT, OMP_PROBE = _resolve_omp_wait(sys.argv[1:]) if __name__ == "__main__" else ("default", None)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from _core_runs import run_batch, run_hvp  # noqa: E402
from _dense_worker import dense_worker, run_dense  # noqa: E402
from _timing import (
    THREADS,
    base_meta,
    exit_status,
    finish_meta,
    flag,
    fmt_b,
    fmt_t,
    make_log,  # noqa: E402
    table_head,
    write_json,
    yesno,
)
from _workloads import CORE_WORKLOADS, K_BATCH, Problem, describe  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETED = ("W2", "W3")  # workloads the targets apply to; W4 is for information


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def _met(r, ok, wl):
    """The "met?" cell: yes/no on targeted workloads, a dash otherwise; WRONG RESULT if wrong."""
    if wl in TARGETED:
        return flag(r, yesno(ok, r["correct"]))
    return flag(r, "—" if r["correct"] else "WRONG RESULT")


def _hvp_rows(wl, r):
    g = r["in_gradients"]
    x = g["nethessian"]
    y = r["first_call_in_gradients"]
    return [
        (
            wl,
            f"1 HVP, steady state ({r.get('engine', 'kept-graph')})",
            f"{fmt_t(r['median_s']['nethessian'])} = {x:.2f} grads",
            f"jvp(grad) {g['torch.func jvp(grad)']:.2f}; db rebuilt {g['double backward rebuilt']:.2f}; "
            f"raw kept graph {g['raw kept graph (plain torch)']:.2f} (grad = {fmt_t(r['median_s']['gradient'])})",
            f"{x:.2f} grads",
            "≤ 2 grads" if wl in TARGETED else "info",
            _met(r, x <= 2, wl),
        ),
        (
            wl,
            "1 HVP, first call (builds graph)",
            f"{fmt_t(r['first_call_median_s'])} = {y:.2f} grads",
            f"db rebuilt {g['double backward rebuilt']:.2f}; construction {r['construct_in_gradients']:.2f} "
            "grads (untimed above)",
            f"{y / g['double backward rebuilt']:.2f}× db rebuilt",
            "info",
            flag(r, "—"),
        ),
    ]


def _batch_rows(wl, r):
    g = r["in_gradients"]
    x = g["nethessian op @ V"]
    return [
        (
            wl,
            f"{K_BATCH} HVPs, op @ V ({r['nethessian_mode']})",
            f"{fmt_t(r['median_s']['nethessian op @ V'])} = {x:.1f} grads",
            f"loop of 32 {g['nethessian loop of 32']:.1f}; vmap(jvp(grad)) {g['vmap(jvp(grad))']:.1f}; "
            f"raw batched kept {g['raw kept graph batched (plain torch)']:.1f}",
            f"{x:.1f} grads",
            "≤ 35 grads" if wl in TARGETED else "info",
            _met(r, x <= 35, wl),
        )
    ]


def _dense_row(d):
    s = d["summary"]
    a, b = s["nethessian"], s["torch.func.hessian"]
    speed = b["time_median_s"] / a["time_median_s"]
    mem = a["extra_peak_median_bytes"] / b["extra_peak_median_bytes"]
    peers = "; ".join(
        f"{m} {fmt_t(v['time_median_s'])} +{fmt_b(v['extra_peak_median_bytes'])}"
        for m, v in s.items()
        if m != "nethessian"
    )
    return (
        "W2",
        "dense Hessian: time, extra peak RSS",
        f"{fmt_t(a['time_median_s'])}, +{fmt_b(a['extra_peak_median_bytes'])}",
        peers,
        f"{speed:.2f}× faster, {mem:.2f}× memory (vs torch.func)",
        "≥ 2× faster, ≤ 0.25× memory",
        flag(d, yesno(speed >= 2 and mem <= 0.25, d["correct"])),
    )


def build_table(res):
    rows = []
    for wl, r in res.get("hvp", {}).items():
        rows += _hvp_rows(wl, r)
    for wl, r in res.get("batch", {}).items():
        rows += _batch_rows(wl, r)
    if "dense" in res:
        rows.append(_dense_row(res["dense"]))
    head = ("workload", "measurement", "nethessian", "peers (in gradients unless said)", "ratio", "target", "met?")
    return "\n".join(table_head(head) + ["| " + " | ".join(r) + " |" for r in rows])


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    ap.add_argument(
        "--only", action="append", choices=["hvp", "batch", "dense"], help="run only this part (repeatable)"
    )
    ap.add_argument("--workloads", default="W2,W3,W4", help="HVP/batch workloads (default W2,W3,W4)")
    ap.add_argument(
        "--out", default=None, help="JSON output (default benchmarks/results/core.json, core_quick.json with --quick)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch threads (default: the cores this process may use, {THREADS})",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        metavar="S",
        help="before each section wait up to S seconds for other processes to use "
        "under 0.3 cores (default 20; 0: don't wait)",
    )
    ap.add_argument(
        "--omp-wait",
        choices=["auto", "default", "passive"],
        default="auto",
        help="OpenMP wait policy: passive (threads sleep at barriers: robust on a busy "
        "machine), default (torch's), auto (passive if others are busy at start); "
        "an OMP_WAIT_POLICY in the environment wins",
    )
    ap.add_argument("--dense-worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--worker-save", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _settings(quick):
    if quick:
        reps, sample_s, first_reps, breps, bsample_s, rounds = 3, 0.02, 2, 2, 0.05, 1
    else:
        reps, sample_s, first_reps, breps, bsample_s, rounds = 15, 0.1, 7, 9, 0.2, 3
    return {
        "reps": reps,
        "sample_s": sample_s,
        "first_reps": first_reps,
        "batch_reps": breps,
        "batch_sample_s": bsample_s,
        "dense_rounds": rounds,
    }


def _meta(args, parts, workloads, st):
    return base_meta(
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        omp_wait_choice=OMP_WAIT,
        others_cpu_cores_at_start=OMP_PROBE,
        quick=args.quick,
        parts=parts,
        workloads=workloads,
        settings=st,
        workload_descriptions=describe(CORE_WORKLOADS),
    )


def _run_parts(args, parts, workloads, st, section, log):
    res, problems = {}, {}
    if "hvp" in parts:
        res["hvp"] = {}
        for wl in workloads:
            pb = problems.setdefault(wl, Problem(wl))
            res["hvp"][wl] = section(
                f"hvp/{wl}", lambda pb=pb: run_hvp(pb, st["reps"], st["sample_s"], st["first_reps"], log)
            )
    if "batch" in parts:
        res["batch"] = {}
        for wl in workloads:
            pb = problems.setdefault(wl, Problem(wl))
            res["batch"][wl] = section(
                f"batch/{wl}", lambda pb=pb: run_batch(pb, st["batch_reps"], st["batch_sample_s"], log)
            )
    problems.clear()
    gc.collect()
    if "dense" in parts:
        res["dense"] = section("dense/W2", lambda: run_dense(st["dense_rounds"], args.threads, log))
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.dense_worker:
        dense_worker(args.dense_worker, args.worker_out, args.worker_save, args.threads)
        return 0
    torch.set_num_threads(args.threads)
    parts = args.only or ["hvp", "batch", "dense"]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    st = _settings(args.quick)
    out_path = Path(args.out) if args.out else HERE / "results" / ("core_quick.json" if args.quick else "core.json")
    t_start = time.perf_counter()
    log = make_log(t_start)
    meta = _meta(args, parts, workloads, st)
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OpenMP wait policy "
        f"{os.environ.get('OMP_WAIT_POLICY', 'default')} ({OMP_WAIT}; others used "
        f"{'?' if OMP_PROBE is None else f'{OMP_PROBE:.1f}'} cores at start), parts {parts}"
    )
    contention = meta["others_cpu_cores"] = {}
    res = _run_parts(
        args, parts, workloads, st, lambda key, fn: measured_section(key, fn, contention, args.wait_quiet, log), log
    )
    finish_meta(meta, t_start)
    table = build_table(res)
    print(table)
    write_json(out_path, {"meta": meta, "results": res, "table": table}, log)
    ok = all(r["correct"] for part in ("hvp", "batch") for r in res.get(part, {}).values())
    ok = ok and res.get("dense", {}).get("correct", True)
    return exit_status(ok, log, "CORRECTNESS CHECK FAILED: see rel_err fields in the JSON")


if __name__ == "__main__":
    sys.exit(main())
