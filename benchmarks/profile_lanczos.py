#!/usr/bin/env python
"""Where ``nh.eigenvalues`` spends its time: products against the solver's own work.

Instruments one process (no peers): every product through the adapter is timed and
attributed to the phase it ran in (symmetry check, Lanczos expansion, verification),
and the solver's own phases (orthogonalisation, restarts, Ritz computations, the
verification's arithmetic) are timed around them. Runs interleave the settings given
and report medians.

    .venv/bin/python benchmarks/profile_lanczos.py                       # W3 (MLP), k=5, tol=1e-3
    .venv/bin/python benchmarks/profile_lanczos.py --workload W2 --runs 2 # smoke (~5 s)
    .venv/bin/python benchmarks/profile_lanczos.py --blocks 1,4 --eigsh   # + eigsh on curvlinops

The "own work" column is everything but the products, as a fraction of the products' time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# OpenMP waits as the environment says (bench_spectrum: --omp-wait); PASSIVE doubles small
# kernels on an idle machine (FACTS.md), e.g. a kept-graph product on the MLP 5.2 -> 9-11 ms.

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import nethessian as nh  # noqa: E402
from nethessian.linalg import _lanczos, _operator, _restart  # noqa: E402
from _workloads import make_workload  # noqa: E402


class Clock:
    """Seconds per phase; products are counted and timed inside whatever phase runs them."""

    def __init__(self):
        self.t, self.n, self.phase = defaultdict(float), defaultdict(int), "other"

    @contextlib.contextmanager
    def in_phase(self, name):
        prev, self.phase = self.phase, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] += time.perf_counter() - t0
            self.phase = prev


def _wrap(clock, owner, attr, phase):
    orig = getattr(owner, attr)

    def timed(*a, **kw):
        with clock.in_phase(phase):
            return orig(*a, **kw)

    setattr(owner, attr, timed)
    return owner, attr, orig


@contextlib.contextmanager
def instrumented(clock):
    """Patch the solver's phases and the adapter's product with timers (undone on exit)."""
    orig_mm = _operator.Operator.__matmul__

    def product(self, v):
        k = 1 if v.ndim == 1 else v.shape[1]
        t0 = time.perf_counter()
        out = orig_mm(self, v)
        dt = time.perf_counter() - t0
        clock.t["products:" + clock.phase] += dt
        clock.n["products:" + clock.phase] += k
        clock.t["~products_in:" + clock.phase] += dt
        return out

    patches = [
        _wrap(clock, _lanczos, "check_symmetric", "symmetry"),
        _wrap(clock, _restart._Krylov, "expand", "expand"),
        _wrap(clock, _restart._Krylov, "restart", "restart"),
        _wrap(clock, _restart._Krylov, "start", "start"),
        _wrap(clock, _lanczos, "_verified", "verify"),
        _wrap(clock, _restart._Ritz, "__init__", "ritz"),
        _wrap(clock, _restart._Ritz, "worst_bound", "ritz"),
    ]
    _operator.Operator.__matmul__ = product
    try:
        yield
    finally:
        _operator.Operator.__matmul__ = orig_mm
        for owner, attr, orig in patches:
            setattr(owner, attr, orig)


def one_run(model, loss_fn, X, y, seed, k, tol, b, extra):
    """Total seconds, products, and the phase table of one ``nh.eigenvalues`` run."""
    clock = Clock()
    op = nh.HessianOperator(model, loss_fn, (X, y))
    with instrumented(clock), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        with clock.in_phase("total"):
            r = nh.eigenvalues(op, k=k, tol=tol, seed=seed, block_size=b, **extra)
        total = time.perf_counter() - t0
    prod = sum(v for n, v in clock.t.items() if n.startswith("products:"))
    phases = ("expand", "restart", "ritz", "verify", "start", "symmetry")
    own = {p: clock.t[p] - clock.t["~products_in:" + p] for p in phases}
    return {
        "total": total,
        "matvecs": r.num_matvecs,
        "products": prod,
        "own": own,
        "own_sum": total - prod,
        "converged": r.converged,
        "eigenvalues": r.eigenvalues.tolist(),
        "n": dict(clock.n),
    }


def eigsh_run(model, loss_fn, X, y, seed, k, tol):
    """scipy eigsh(which='LA') on curvlinops' HessianLinearOperator, as bench_spectrum runs it."""
    import curvlinops as cl
    from scipy.sparse.linalg import LinearOperator, eigsh

    t0 = time.perf_counter()
    H = cl.HessianLinearOperator(model, loss_fn, list(model.parameters()), [(X, y)], check_deterministic=False)
    L = H.to_scipy()
    count = [0]

    def mv(v):
        count[0] += 1 if v.ndim == 1 or v.shape[-1] == 1 else v.shape[-1]
        return L @ v

    Lc = LinearOperator(L.shape, matvec=mv, dtype=L.dtype)
    v0 = np.random.default_rng(seed).standard_normal(L.shape[0])
    w, _ = eigsh(Lc, k=k, which="LA", tol=tol, v0=v0)
    return {"total": time.perf_counter() - t0, "matvecs": count[0], "eigenvalues": sorted(w.tolist())[::-1]}


def bare_product(model, loss_fn, X, y, columns=1, reps=10):
    """Mean seconds of one product of ``columns`` columns through the operator (after a warm-up)."""
    op = nh.HessianOperator(model, loss_fn, (X, y))
    v = torch.randn(op.shape[0], columns, dtype=X.dtype)
    v = v[:, 0] if columns == 1 else v
    op @ v
    t0 = time.perf_counter()
    for _ in range(reps):
        op @ v
    return (time.perf_counter() - t0) / reps


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="MLP", help="a _workloads name (MLP = bench_spectrum's, W3 = bench_core's)")
    ap.add_argument("--runs", type=int, default=5, help="seeds per setting (interleaved)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--blocks", default="1")
    ap.add_argument("--ncv", default="", help="comma-separated ncv values to compare (default: nethessian's)")
    ap.add_argument("--eigsh", default="", help="comma-separated eigsh tols to run on curvlinops (e.g. 1e-2)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    return ap.parse_args(argv)


def _settings(args):
    out = []
    for b in (int(x) for x in args.blocks.split(",")):
        for ncv in [None] + [int(x) for x in args.ncv.split(",") if x]:
            extra = {} if ncv is None else {"ncv": ncv}
            out.append((f"nethessian b={b}" + ("" if ncv is None else f" ncv={ncv}"), b, extra))
    return out


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    model, loss_fn, X, y = make_workload(args.workload)
    t1 = {c: bare_product(model, loss_fn, X, y, c) for c in (1, 2, 5)}
    print(
        f"{args.workload}: bare product ({nh.HessianOperator(model, loss_fn, (X, y)).engine}) "
        + ", ".join(f"{c} column{'s' if c > 1 else ''} {t * 1e3:.2f} ms" for c, t in t1.items())
        + f"; {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}"
    )
    one_run(model, loss_fn, X, y, 99, args.k, args.tol, 1, {})  # warm-up
    settings = _settings(args)
    runs = defaultdict(list)
    for seed in range(args.runs):
        for name, b, extra in settings:
            runs[name].append(one_run(model, loss_fn, X, y, seed, args.k, args.tol, b, extra))
        for t in (float(x) for x in args.eigsh.split(",") if x):
            runs[f"eigsh tol={t:g} curvlinops"].append(eigsh_run(model, loss_fn, X, y, seed, args.k, t))
    print(f"load after: {os.getloadavg()[0]:.2f}")
    report(runs)


def report(runs):
    med = statistics.median
    head = f"{'method':<28} {'time s':>7} {'Av':>5} {'prod s':>7} {'own s':>7} {'own/prod':>8}  own by phase (s)"
    print(head)
    for name, rs in runs.items():
        line = f"{name:<28} {med(r['total'] for r in rs):7.3f} {med(r['matvecs'] for r in rs):5.0f}"
        if "own" in rs[0]:
            frac = med(r["own_sum"] / r["products"] for r in rs)
            phases = ", ".join(f"{p} {med(r['own'][p] for r in rs):.3f}" for p in rs[0]["own"])
            line += f" {med(r['products'] for r in rs):7.3f} {med(r['own_sum'] for r in rs):7.3f} {frac:8.1%}  {phases}"
            line += f"  conv {sum(r['converged'] for r in rs)}/{len(rs)}"
        print(line)
    print("eigenvalues (first run):")
    for name, rs in runs.items():
        print(f"  {name:<28} " + " ".join(f"{x:.6f}" for x in rs[0]["eigenvalues"]))


if __name__ == "__main__":
    sys.exit(main())
