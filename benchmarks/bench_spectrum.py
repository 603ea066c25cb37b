#!/usr/bin/env python
"""Spectrum benchmark: top-5 Hessian eigenvalues and trace estimates, nethessian vs peers.

Everything runs side by side in one process, round-robin, on the same model, loss and
data, against the peers of the optional ``bench`` extra (PyHessian, hessian-eigenthings,
curvlinops, BackPACK). See benchmarks/README.md.

    .venv/bin/python benchmarks/bench_spectrum.py             # full run (~6-10 min on 2 cores)
    .venv/bin/python benchmarks/bench_spectrum.py --quick     # smoke test (~2 min)
    .venv/bin/python benchmarks/bench_spectrum.py --only eig --workloads MLP

(a) ``eig``: the 5 largest eigenvalues to relative accuracy 1e-3. Wall time (operator
    construction included) and Hessian-vector products of nethessian (block sizes 1, 4,
    8), scipy ``eigsh`` on curvlinops' ``HessianLinearOperator`` (and, to tell the
    product's cost from the algorithm's product count, on nethessian's ``to_scipy()``),
    PyHessian's power iteration and hessian-eigenthings' Lanczos; each result's relative
    error against a float64 reference (``eigsh`` tol 1e-10 on curvlinops' operator of a
    float64 copy of the model), cross-checked against nethessian at tol 1e-8.
    Also: nethessian b=1's own work (everything but its products, every product timed where it
    runs; ``profile_lanczos.py``) against the target "under 20 % of the products' time".
(b) ``trace``: error against products for Hutchinson, Hutch++ and XTrace over several
    seeds (mean |error|, mean reported standard error, z = error / stderr), against
    BackPACK's exact Hessian diagonal (``DiagHessian``) summed; curvlinops'
    ``hutchinson_trace`` / ``hutchpp_trace`` / ``xtrace`` at the same products for time.
"""

from __future__ import annotations

import os

# numpy/scipy OpenBLAS threads starve torch's on these small machines (FACTS.md): eigsh
# driving torch products ran ~3x slower per product until this was set before numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys  # noqa: E402
import time  # noqa: E402

from _machine import cpu_snapshot, measured_section, others_load  # noqa: E402


# OpenMP waiting policy, decided before torch loads (FACTS.md): passive waiting is far less
# sensitive to other processes on a shared machine, but on an idle one it doubles small
# kernels — measured here: a kept-graph product on the MLP 5.2 ms (default) vs 9-11 ms
# (PASSIVE), and the eigensolver's own vector work ~1.5x. --omp-wait auto (default): passive
# only when other processes are busy at the start; OMP_WAIT_POLICY in the environment wins.
def _omp_wait(argv):
    choice = "auto"
    for i, a in enumerate(argv):
        if a.startswith("--omp-wait"):
            choice = a.split("=", 1)[1] if "=" in a else argv[i + 1]
    if "OMP_WAIT_POLICY" in os.environ:
        return f"env:{os.environ['OMP_WAIT_POLICY']}"
    if choice == "auto":
        a = cpu_snapshot()
        time.sleep(2.0)
        choice = "passive" if others_load(a, cpu_snapshot()) > 0.3 else "default"
    if choice == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return choice


OMP_WAIT = _omp_wait(sys.argv[1:]) if __name__ == "__main__" else "default"
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _peers import K, TARGET_ACC, EigProblem, import_peers  # noqa: E402
from _spectrum_eig import run_eig  # noqa: E402
from _spectrum_report import eig_table, targets, targets_table, trace_table  # noqa: E402
from _spectrum_trace import run_trace  # noqa: E402
from _timing import THREADS, base_meta, exit_status, finish_meta, make_log, write_json  # noqa: E402
from _workloads import SPECTRUM_WORKLOADS, describe  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, few seeds (smoke test)")
    ap.add_argument("--only", action="append", choices=["eig", "trace"], help="run only this part (repeatable)")
    ap.add_argument("--workloads", default="MLP,CNN", help="comma-separated: MLP, CNN (default both)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="eigenvalue rounds (seeds) per method (default 4; quick 1)"
    )
    ap.add_argument("--blocks", default="1,4,8", help="nethessian block sizes (default 1,4,8; 1 is always run)")
    ap.add_argument(
        "--pyhessian-tight",
        default="1e-5,1000",
        metavar="TOL,MAXITER",
        help="extra PyHessian row with a tighter tol, to show what reaching 1e-3 costs it "
        "(default 1e-5,1000; 'none' to skip)",
    )
    ap.add_argument("--budgets", default=None, help="trace budgets in products (default 30,60,90,150; quick 30,90)")
    ap.add_argument("--seeds", type=int, default=None, help="trace seeds per method and budget (default 6; quick 2)")
    ap.add_argument(
        "--curv-seeds", type=int, default=None, help="of those, seeds also run through curvlinops (default 1)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="JSON output (default benchmarks/results/spectrum.json, spectrum_quick.json with --quick)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch threads (default: the cores this process may use, {THREADS})",
    )
    ap.add_argument(
        "--omp-wait",
        choices=["auto", "default", "passive"],
        default="auto",
        help="OpenMP waiting policy: passive only if the machine is busy at the start (auto, default), "
        "or forced; OMP_WAIT_POLICY in the environment overrides it",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        metavar="S",
        help="before each section wait up to S seconds for other processes to use under 0.3 cores",
    )
    args = ap.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in SPECTRUM_WORKLOADS:
            ap.error(f"unknown workload {w!r}; valid: {', '.join(SPECTRUM_WORKLOADS)}")
    return args


def _settings(args):
    """The run's settings, with the --quick defaults where a flag was not given."""
    tight = None
    if args.pyhessian_tight.lower() != "none":
        t, it = args.pyhessian_tight.split(",")
        tight = (float(t), int(it))
    return {
        "rounds": args.rounds or (1 if args.quick else 4),
        "blocks": sorted({1, *(int(b) for b in args.blocks.split(",") if b.strip())}),
        "pyhessian_tight": tight,
        "budgets": [int(b) for b in (args.budgets or ("30,90" if args.quick else "30,60,90,150")).split(",")],
        "seeds": args.seeds or (2 if args.quick else 6),
        "curv_seeds": args.curv_seeds if args.curv_seeds is not None else 1,
        "k": K,
        "tol": TARGET_ACC,
    }


def _report(res_eig, res_trace, ts, contention):
    tables = []
    if res_eig:
        tables.append(
            "### Top-5 eigenvalues to 1e-3 (medians over seeds; speed-up = method time / "
            "nethessian b=1 time)\n\n" + eig_table(res_eig)
        )
    if res_trace:
        tables.append(
            "### Trace: error vs products (reference: BackPACK exact diagonal, summed)\n\n" + trace_table(res_trace)
        )
    if ts:
        tables.append("### Targets\n\n" + targets_table(ts))
    flags = [f"{k}: others used {v['during']:.1f} cores" for k, v in contention.items() if v["during"] > 0.3]
    if flags:
        tables.append("Contended sections (treat times as qualitative): " + "; ".join(flags))
    return "\n\n".join(tables)


def _run_parts(args, parts, mods, st, section, log):
    res_eig, res_trace = {}, {}
    if "eig" in parts:
        for wl in args.workloads:
            pb = EigProblem(wl, mods)
            res_eig[wl] = section(
                f"eig/{wl}", lambda pb=pb: run_eig(pb, st["rounds"], st["blocks"], st["pyhessian_tight"], log)
            )
    if "trace" in parts:
        for wl in args.workloads:
            res_trace[wl] = section(
                f"trace/{wl}", lambda wl=wl: run_trace(wl, mods, st["budgets"], st["seeds"], st["curv_seeds"], log)
            )
    return res_eig, res_trace


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.only or ["eig", "trace"]
    st = _settings(args)
    default_out = HERE / "results" / ("spectrum_quick.json" if args.quick else "spectrum.json")
    out_path = Path(args.out) if args.out else default_out
    t_start = time.perf_counter()
    log = make_log(t_start)
    mods, peer_status = import_peers(log)
    meta = base_meta(
        numpy=np.__version__,
        scipy=importlib.metadata.version("scipy"),
        quick=args.quick,
        parts=parts,
        workloads=describe(args.workloads),
        peers=peer_status,
        settings=st,
        omp_wait=OMP_WAIT,
    )
    log(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, OpenMP wait {OMP_WAIT}; peers: "
        + ", ".join(f"{m} {s.get('version', '')}{'' if s['ok'] else ' (UNAVAILABLE)'}" for m, s in peer_status.items())
    )
    contention = meta["others_cpu_cores"] = {}
    res_eig, res_trace = _run_parts(
        args, parts, mods, st, lambda key, fn: measured_section(key, fn, contention, args.wait_quiet, log), log
    )
    finish_meta(meta, t_start)
    ts = targets(res_eig, res_trace)
    text = _report(res_eig, res_trace, ts, contention)
    print(text)
    write_json(
        out_path, {"meta": meta, "eig": res_eig, "trace": res_trace, "targets": ts, "table": text}, log, default=float
    )
    ok = all(r["reference"]["cross_check_ok"] for r in res_eig.values())
    ok = ok and all(r["reference"]["entry_check_ok"] for r in res_trace.values() if "reference" in r)
    return exit_status(
        ok, log, "REFERENCE CHECK FAILED: see eig.*.reference.cross_check_rel / trace.*.reference.entry_check_rel"
    )


if __name__ == "__main__":
    sys.exit(main())
