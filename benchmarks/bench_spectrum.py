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
# Passive OpenMP waiting: far less sensitive to other processes on a shared machine
# (see bench_core.py). Override with OMP_WAIT_POLICY=ACTIVE in the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import argparse
import copy
import datetime as _dt
import gc
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

from _machine import measured_section

import numpy as np
import torch

import nethessian as nh

HERE = Path(__file__).resolve().parent
THREADS = len(os.sched_getaffinity(0))
K = 5                 # eigenvalues wanted
TARGET_ACC = 1e-3     # relative accuracy of the top-5 asked for
TARGET_SPEEDUP = 3.0  # nethessian vs scipy eigsh and PyHessian
REF_AGREE = 1e-5      # float64 eigsh reference vs nethessian tol=1e-8 (float32 products)
DIAG_CHECK = 1e-4     # BackPACK diagonal entries vs e_i^T H e_i, relative to max |diag|

PEERS = {  # import name -> distribution name
    "curvlinops": "curvlinops-for-pytorch",
    "pyhessian": "pyhessian",
    "hessian_eigenthings": "hessian-eigenthings",
    "backpack": "backpack-for-pytorch",
}


# ----------------------------------------------------------------------------------------
# workloads and peers
# ----------------------------------------------------------------------------------------
WORKLOADS = {
    "MLP": ("MLP 784-128-64-10 tanh, CE, N=1024 (P=109,386) = nh.examples.mlp()", nh.examples.mlp, 109386),
    "CNN": ("CNN conv 1->8->16, max-pool, linear, N=256 (P=5,258) = nh.examples.cnn()", nh.examples.cnn, 5258),
}


def make_workload(name):
    _, fn, P = WORKLOADS[name]
    model, loss_fn, (X, y) = fn()
    assert sum(p.numel() for p in model.parameters()) == P, name
    return model, loss_fn, X, y


def import_peers(log):
    """Import every peer; a missing or broken one is recorded, not fatal."""
    mods, status = {}, {}
    for mod, dist in PEERS.items():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            status[mod] = {"ok": False, "why": f"{dist} is not installed (pip install -e '.[bench]')"}
            log(f"peer {mod}: not installed")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mods[mod] = importlib.import_module(mod)
                if mod == "pyhessian":  # the module object (the package re-exports the class `hessian`)
                    importlib.import_module("pyhessian.hessian")
                    mods["pyhessian.hessian"] = sys.modules["pyhessian.hessian"]
            status[mod] = {"ok": True, "version": version}
        except Exception as exc:  # noqa: BLE001 - any import failure is recorded
            status[mod] = {"ok": False, "version": version, "why": f"{type(exc).__name__}: {exc}"}
            log(f"peer {mod}: import failed: {exc}")
    return mods, status


# ----------------------------------------------------------------------------------------
# contention: these machines are shared; measure what others use while we run
# ----------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------
# product counting
# ----------------------------------------------------------------------------------------
class Count:
    def __init__(self):
        self.n = 0


def count_curvlinops(H):
    """Count the columns every product of a curvlinops operator applies (its ``_matmat``)."""
    c = Count()
    inner = H._matmat

    def counted(M):
        c.n += int(M[0].shape[-1])
        return inner(M)

    H._matmat = counted  # instance attribute shadows the method; __matmul__ calls self._matmat
    return c


def counting_scipy(L, c):
    """A scipy LinearOperator that counts columns through ``L`` (when ``c`` is not None)."""
    from scipy.sparse.linalg import LinearOperator

    def mv(x):
        if c is not None:
            c.n += 1 if x.ndim == 1 else x.shape[1]
        return L.matvec(x) if x.ndim == 1 else L.matmat(x)

    return LinearOperator(L.shape, matvec=mv, matmat=mv, rmatvec=mv, rmatmat=mv, dtype=np.float64)


def rel_errors(vals, ref):
    """Per-eigenvalue relative errors, both sorted descending (largest algebraic)."""
    v = np.sort(np.asarray(vals, dtype=np.float64))[::-1]
    r = np.asarray(ref, dtype=np.float64)
    if v.size < r.size:
        return [math.inf] * r.size
    return (np.abs(v[: r.size] - r) / np.abs(r)).tolist()


# ----------------------------------------------------------------------------------------
# (a) top-5 eigenvalues: one callable per method, each run end to end (operator built inside)
# ----------------------------------------------------------------------------------------
class EigProblem:
    def __init__(self, name, mods):
        self.name = name
        self.model, self.loss_fn, self.X, self.y = make_workload(name)
        self.P = sum(p.numel() for p in self.model.parameters())
        self.mods = mods

    # --- nethessian -------------------------------------------------------------------
    def nh(self, seed, *, block_size=1, tol=TARGET_ACC):
        t0 = time.perf_counter()
        op = nh.HessianOperator(self.model, self.loss_fn, (self.X, self.y))
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = nh.eigenvalues(op, k=K, which="largest", tol=tol, seed=seed, block_size=block_size)
        t2 = time.perf_counter()
        return {"eigenvalues": r.eigenvalues.tolist(), "matvecs": int(r.num_matvecs), "setup_s": t1 - t0,
                "solve_s": t2 - t1, "time_s": t2 - t0, "converged": bool(r.converged),
                "residuals": r.residuals.tolist(), "warnings": [str(w.message) for w in caught]}

    # --- scipy eigsh -----------------------------------------------------------------------
    def _eigsh(self, L, c, seed, tol, t0, t1):
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).standard_normal(L.shape[0])
        w, _ = eigsh(L, k=K, which="LA", tol=tol, v0=v0)
        t2 = time.perf_counter()
        return {"eigenvalues": np.sort(w)[::-1].tolist(), "matvecs": c.n, "setup_s": t1 - t0,
                "solve_s": t2 - t1, "time_s": t2 - t0}

    def curvlinops_op(self, model=None):
        cl = self.mods["curvlinops"]
        model = model or self.model
        # check_deterministic=False: the default check spends extra products at construction
        return cl.HessianLinearOperator(model, self.loss_fn, [p for p in model.parameters()],
                                        [(self.X if model is self.model else self.X.double(), self.y)],
                                        check_deterministic=False)

    def eigsh_curvlinops(self, seed, *, tol):
        t0 = time.perf_counter()
        H = self.curvlinops_op()
        c = count_curvlinops(H)
        L = counting_scipy(H.to_scipy(), None)
        t1 = time.perf_counter()
        return self._eigsh(L, c, seed, tol, t0, t1)

    def eigsh_nethessian(self, seed, *, tol):
        t0 = time.perf_counter()
        op = nh.HessianOperator(self.model, self.loss_fn, (self.X, self.y))
        c = Count()
        L = counting_scipy(op.to_scipy(), c)
        t1 = time.perf_counter()
        return self._eigsh(L, c, seed, tol, t0, t1)

    # --- PyHessian ---------------------------------------------------------------------------
    def pyhessian(self, seed, *, tol=None, max_iter=None):
        ph, phm = self.mods["pyhessian"], self.mods["pyhessian.hessian"]
        model = copy.deepcopy(self.model)  # PyHessian leaves graph-carrying .grad on the model
        c = Count()
        inner = phm.hessian_vector_product

        def counted(*a, **kw):
            c.n += 1
            return inner(*a, **kw)

        kw = {}
        if tol is not None:
            kw["tol"] = tol
        if max_iter is not None:
            kw["maxIter"] = max_iter
        phm.hessian_vector_product = counted
        try:
            torch.manual_seed(seed)  # PyHessian draws its start vectors from torch's global RNG
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # backward(create_graph=True) reference-cycle warning
                t0 = time.perf_counter()
                hc = ph.hessian(model, self.loss_fn, data=(self.X, self.y), cuda=False)
                t1 = time.perf_counter()
                ev, _ = hc.eigenvalues(top_n=K, **kw)
                t2 = time.perf_counter()
        finally:
            phm.hessian_vector_product = inner
        for p in model.parameters():
            p.grad = None
        return {"eigenvalues": [float(x) for x in ev], "matvecs": c.n, "setup_s": t1 - t0,
                "solve_s": t2 - t1, "time_s": t2 - t0}

    # --- hessian-eigenthings ------------------------------------------------------------------
    def eigenthings(self, seed):
        he = self.mods["hessian_eigenthings"]
        model = copy.deepcopy(self.model)
        c = Count()
        t0 = time.perf_counter()
        hop = he.HessianOperator(model, [(self.X, self.y)], he.supervised_loss(self.loss_fn))
        inner = hop.matvec

        def counted(v):
            c.n += 1
            return inner(v)

        hop.matvec = counted
        t1 = time.perf_counter()
        res = he.lanczos(hop, k=K, seed=seed)  # defaults: which="LM", max_iter=2k, tol=1e-4
        t2 = time.perf_counter()
        return {"eigenvalues": res.eigenvalues.double().tolist(), "matvecs": c.n, "setup_s": t1 - t0,
                "solve_s": t2 - t1, "time_s": t2 - t0, "iterations": int(res.iterations),
                "self_reported_converged": res.converged.tolist()}

    # --- reference ---------------------------------------------------------------------------
    def reference(self, log):
        """float64 eigsh (tol 1e-10) on curvlinops' operator of a float64 copy; nethessian tol 1e-8 as a check."""
        out = {}
        if "curvlinops" in self.mods:
            m64 = copy.deepcopy(self.model).double()
            t0 = time.perf_counter()
            H = self.curvlinops_op(m64)
            c = count_curvlinops(H)
            r = self._eigsh(counting_scipy(H.to_scipy(), None), c, 12345, 1e-10, t0, time.perf_counter())
            out["float64 eigsh tol=1e-10 (curvlinops operator)"] = r
        t0 = time.perf_counter()
        r = self.nh(12345, tol=1e-8)
        out["nethessian tol=1e-8 (float32)"] = r
        names = list(out)
        ref = out[names[0]]["eigenvalues"]
        agree = max(rel_errors(out[names[-1]]["eigenvalues"], ref)) if len(names) > 1 else None
        log(f"  [{self.name}] reference ({names[0]}): " + ", ".join(f"{x:.8g}" for x in ref)
            + (f"; nethessian tol=1e-8 agrees to {agree:.1e}" if agree is not None else ""))
        return {"eigenvalues": ref, "source": names[0], "runs": out, "cross_check_rel": agree,
                "cross_check_ok": agree is None or agree <= REF_AGREE}


def eig_methods(pb: EigProblem, blocks, pyhessian_tight):
    """name -> (callable(seed), description). Peers that failed to import are left out."""
    m = {}
    for b in blocks:
        m[f"nethessian b={b}"] = (lambda s, b=b: pb.nh(s, block_size=b),
                                  f"nh.eigenvalues(k=5, tol=1e-3, block_size={b}), fresh HessianOperator")
    if "curvlinops" in pb.mods:
        m["eigsh tol=1e-3 on curvlinops"] = (lambda s: pb.eigsh_curvlinops(s, tol=1e-3),
                                             "scipy eigsh(k=5, which='LA', tol=1e-3) on HessianLinearOperator.to_scipy()")
        m["eigsh tol=1e-2 on curvlinops"] = (lambda s: pb.eigsh_curvlinops(s, tol=1e-2),
                                             "same, tol=1e-2 (looser; still reached 1e-3 in tests)")
    m["eigsh tol=1e-3 on nethessian"] = (lambda s: pb.eigsh_nethessian(s, tol=1e-3),
                                         "diagnostic: scipy eigsh tol=1e-3 on nethessian's op.to_scipy()")
    if "pyhessian" in pb.mods:
        m["PyHessian defaults"] = (lambda s: pb.pyhessian(s),
                                   "hessian(model, criterion, data, cuda=False).eigenvalues(top_n=5): power iteration, tol=1e-3, maxIter=100")
        if pyhessian_tight:
            tol, it = pyhessian_tight
            m[f"PyHessian tol={tol:g}"] = (lambda s: pb.pyhessian(s, tol=tol, max_iter=it),
                                           f"same, tol={tol:g}, maxIter={it} (tightened to try to reach 1e-3)")
    if "hessian_eigenthings" in pb.mods:
        m["hessian-eigenthings defaults"] = (lambda s: pb.eigenthings(s),
                                             "lanczos(HessianOperator, k=5): defaults which='LM', max_iter=2k=10")
    return m


def warm_up_eig(pb: EigProblem):
    """One product through every engine (first-call costs: autograd, vmap/jacrev setup)."""
    v = torch.randn(pb.P, dtype=pb.X.dtype)
    nh.HessianOperator(pb.model, pb.loss_fn, (pb.X, pb.y)) @ v
    if "curvlinops" in pb.mods:
        H = pb.curvlinops_op()
        H @ v
        H @ torch.randn(pb.P, 3, dtype=pb.X.dtype)
    if "hessian_eigenthings" in pb.mods:
        he = pb.mods["hessian_eigenthings"]
        he.HessianOperator(copy.deepcopy(pb.model), [(pb.X, pb.y)], he.supervised_loss(pb.loss_fn)).matvec(v)


ENGINE = {  # which product engine each method's products go through (for the product-time share)
    "nethessian": "nethessian kept graph", "eigsh tol=1e-3 on nethessian": "nethessian kept graph",
    "eigsh": "curvlinops jvp(jacrev)", "PyHessian": "PyHessian kept graph",
    "hessian-eigenthings": "hessian-eigenthings graph rebuilt",
}


def engine_of(name):
    for prefix, eng in sorted(ENGINE.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix):
            return eng
    return None


def product_costs(pb: EigProblem, reps, log):
    """Median seconds of one single-vector product through each engine (interleaved), and one gradient."""
    v = torch.randn(pb.P, generator=torch.Generator().manual_seed(3), dtype=pb.X.dtype)
    ps = list(pb.model.parameters())
    fns = {"gradient": lambda: torch.autograd.grad(pb.loss_fn(pb.model(pb.X), pb.y), ps)}
    op = nh.HessianOperator(pb.model, pb.loss_fn, (pb.X, pb.y))
    fns["nethessian kept graph"] = lambda: op @ v
    if "curvlinops" in pb.mods:
        H = pb.curvlinops_op()
        fns["curvlinops jvp(jacrev)"] = lambda: H @ v
    if "pyhessian" in pb.mods:
        ph, phm = pb.mods["pyhessian"], pb.mods["pyhessian.hessian"]
        model = copy.deepcopy(pb.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hc = ph.hessian(model, pb.loss_fn, data=(pb.X, pb.y), cuda=False)
        vl = [t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in hc.params]), hc.params)]
        fns["PyHessian kept graph"] = lambda: phm.hessian_vector_product(hc.gradsH, hc.params, vl)
    if "hessian_eigenthings" in pb.mods:
        he = pb.mods["hessian_eigenthings"]
        hop = he.HessianOperator(copy.deepcopy(pb.model), [(pb.X, pb.y)], he.supervised_loss(pb.loss_fn))
        fns["hessian-eigenthings graph rebuilt"] = lambda: hop.matvec(v)
    samples = {n: [] for n in fns}
    for f in fns.values():
        f()
    names = list(fns)
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(3):
                fns[n]()
            samples[n].append((time.perf_counter() - t0) / 3)
    med = {n: statistics.median(x) for n, x in samples.items()}
    log(f"  [{pb.name}] one product: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in med.items()))
    return {"median_s": med, "in_gradients": {n: t / med["gradient"] for n, t in med.items()}}


def run_eig(pb: EigProblem, rounds, blocks, pyhessian_tight, log):
    ref = pb.reference(log)
    warm_up_eig(pb)
    costs = product_costs(pb, 5 if rounds > 1 else 3, log)
    methods = eig_methods(pb, blocks, pyhessian_tight)
    names = list(methods)
    runs = {n: [] for n in names}
    failures = {}
    for r in range(rounds):
        gc.collect()
        rot = names[r % len(names):] + names[:r % len(names)]
        for n in rot:
            if n in failures:
                continue
            try:
                out = methods[n][0](r)
            except Exception as exc:  # noqa: BLE001 - a peer failing is a result, not a crash
                failures[n] = f"{type(exc).__name__}: {exc}"
                log(f"  [{pb.name}] {n} FAILED: {failures[n]}")
                traceback.print_exc(file=sys.stderr)
                continue
            out["seed"] = r
            out["rel_errors"] = rel_errors(out["eigenvalues"], ref["eigenvalues"])
            out["max_rel_error"] = max(out["rel_errors"])
            runs[n].append(out)
            log(f"  [{pb.name}] round {r} {n:<32} {out['time_s']:7.3f} s {out['matvecs']:5d} Av  "
                f"max rel err {out['max_rel_error']:.1e}")
    summary = {}
    for n, rs in runs.items():
        if not rs:
            summary[n] = {"failed": failures.get(n, "no run")}
            continue
        summary[n] = {
            "description": methods[n][1],
            "time_median_s": statistics.median(x["time_s"] for x in rs),
            "setup_median_s": statistics.median(x["setup_s"] for x in rs),
            "matvecs_median": statistics.median(x["matvecs"] for x in rs),
            "matvecs_max": max(x["matvecs"] for x in rs),
            "max_rel_error_worst": max(x["max_rel_error"] for x in rs),
            "max_rel_error_median": statistics.median(x["max_rel_error"] for x in rs),
            "reached_1e-3_all_seeds": all(x["max_rel_error"] <= TARGET_ACC for x in rs),
            "seconds_per_matvec": statistics.median(x["solve_s"] / max(x["matvecs"], 1) for x in rs),
        }
        eng = engine_of(n)
        if eng in costs["median_s"]:
            # share of the solve spent in products, at the engine's bare single-vector cost
            t1 = costs["median_s"][eng]
            summary[n]["engine"] = eng
            summary[n]["product_s"] = t1
            summary[n]["product_share"] = statistics.median(x["matvecs"] * t1 / x["solve_s"] for x in rs)
            summary[n]["non_product_s_per_matvec"] = summary[n]["seconds_per_matvec"] - t1
    base = "nethessian b=1"
    if runs.get(base):
        tb = summary[base]["time_median_s"]
        for n, s in summary.items():
            if "time_median_s" in s:
                s["nethessian_speedup"] = s["time_median_s"] / tb
                # per-round (paired) ratio: same round, same load
                by_seed = {y["seed"]: y["time_s"] for y in runs[base]}
                paired = [x["time_s"] / by_seed[x["seed"]] for x in runs[n] if x["seed"] in by_seed]
                s["nethessian_speedup_paired_median"] = statistics.median(paired)
    return {"reference": ref, "product_costs": costs, "runs": runs, "summary": summary, "failures": failures}


# ----------------------------------------------------------------------------------------
# (b) trace error vs products
# ----------------------------------------------------------------------------------------
TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
CURV_TRACE = {"hutchinson": "hutchinson_trace", "hutch++": "hutchpp_trace", "xtrace": "xtrace"}


def backpack_reference(model, loss_fn, X, y, mods, log, name):
    bp = mods["backpack"]
    from backpack.extensions import DiagHessian

    m = bp.extend(copy.deepcopy(model))
    lf = bp.extend(copy.deepcopy(loss_fn))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = lf(m(X), y)
        with bp.backpack(DiagHessian()):
            loss.backward()
    diag = torch.cat([p.diag_h.detach().reshape(-1) for p in m.parameters()])
    dt = time.perf_counter() - t0
    # check entries against e_i^T H e_i through nethessian's operator (32 products)
    P = diag.numel()
    idx = torch.randperm(P, generator=torch.Generator().manual_seed(7))[:32]
    E = torch.zeros(P, idx.numel(), dtype=X.dtype)
    E[idx, torch.arange(idx.numel())] = 1
    direct = (nh.HessianOperator(model, loss_fn, (X, y)) @ E)[idx, torch.arange(idx.numel())]
    check = float((direct.double() - diag[idx].double()).abs().max() / diag.double().abs().max())
    value = float(diag.double().sum())
    log(f"  [{name}] BackPACK DiagHessian trace {value:.8g} ({dt:.2f} s); 32 entries vs e_i^T H e_i: "
        f"max diff {check:.1e} of max |diag|")
    return {"value": value, "time_s": dt, "entry_check_rel": check, "entry_check_ok": check <= DIAG_CHECK}


def run_trace(name, mods, budgets, seeds, curv_seeds, log):
    model, loss_fn, X, y = make_workload(name)
    if "backpack" not in mods:
        return {"skipped": "BackPACK not available: no reference trace"}
    ref = backpack_reference(model, loss_fn, X, y, mods, log, name)
    tr = ref["value"]
    op = nh.HessianOperator(model, loss_fn, (X, y))
    H = None
    if "curvlinops" in mods:
        H = mods["curvlinops"].HessianLinearOperator(model, loss_fn, list(model.parameters()), [(X, y)],
                                                     check_deterministic=False)
        hc = count_curvlinops(H)
    # warm-up: builds nethessian's kept graph and its batched/loop decision; vmap set-up of curvlinops
    # nethessian decides batched-vs-loop products on its first (P, k) call: make that a realistic one
    nh.trace(op, method="hutchinson", num_matvecs=min(budgets), seed=999)
    for meth in TRACE_METHODS:
        nh.trace(op, method=meth, num_matvecs=6, seed=999)
        if H is not None:
            getattr(mods["curvlinops"], CURV_TRACE[meth])(H, 6)
    runs = {f"nethessian {m}": [] for m in TRACE_METHODS}
    if H is not None:
        runs.update({f"curvlinops {m}": [] for m in TRACE_METHODS})
    k = 0
    for seed in range(seeds):
        for m_budget in budgets:
            gc.collect()
            order = list(TRACE_METHODS[k % 3:] + TRACE_METHODS[:k % 3])
            k += 1
            for meth in order:
                who_order = ["nethessian"] + (["curvlinops"] if H is not None and seed < curv_seeds else [])
                if k % 2:
                    who_order.reverse()  # alternate who goes first
                for who in who_order:
                    if who == "nethessian":
                        t0 = time.perf_counter()
                        est = nh.trace(op, method=meth, num_matvecs=m_budget, seed=seed)
                        dt = time.perf_counter() - t0
                        row = {"seed": seed, "budget": m_budget, "value": est.value, "stderr": est.stderr,
                               "matvecs": int(est.num_matvecs), "time_s": dt}
                    else:
                        fn = getattr(mods["curvlinops"], CURV_TRACE[meth])
                        torch.manual_seed(seed)  # curvlinops draws probes from torch's global RNG
                        hc.n = 0
                        t0 = time.perf_counter()
                        val = float(fn(H, m_budget))
                        dt = time.perf_counter() - t0
                        row = {"seed": seed, "budget": m_budget, "value": val, "stderr": None,
                               "matvecs": hc.n, "time_s": dt}
                    row["abs_error"] = abs(row["value"] - tr)
                    row["rel_error"] = row["abs_error"] / abs(tr)
                    if row["stderr"]:
                        row["z"] = (row["value"] - tr) / row["stderr"]
                    runs[f"{who} {meth}"].append(row)
            log(f"  [{name}] seed {seed} budget {m_budget}: " + ", ".join(
                f"{meth} {runs[f'nethessian {meth}'][-1]['value']:.4g}±{runs[f'nethessian {meth}'][-1]['stderr']:.2g}"
                for meth in TRACE_METHODS) + f" (ref {tr:.6g})")
    # summaries per method and budget
    summary = {}
    for key, rows in runs.items():
        per = {}
        for b in budgets:
            rs = [r for r in rows if r["budget"] == b]
            if not rs:
                continue
            d = {"n": len(rs), "matvecs": statistics.median(r["matvecs"] for r in rs),
                 "mean_abs_error": statistics.fmean(r["abs_error"] for r in rs),
                 "rmse": math.sqrt(statistics.fmean(r["abs_error"] ** 2 for r in rs)),
                 "time_median_s": statistics.median(r["time_s"] for r in rs)}
            if key.startswith("nethessian"):
                zs = [r["z"] for r in rs if "z" in r]
                d["mean_stderr"] = statistics.fmean(r["stderr"] for r in rs)
                d["rms_stderr"] = math.sqrt(statistics.fmean(r["stderr"] ** 2 for r in rs))
                d["rms_z"] = math.sqrt(statistics.fmean(z * z for z in zs)) if zs else None
                d["within_2_stderr"] = sum(abs(z) <= 2 for z in zs) / len(zs) if zs else None
                # same-seed curvlinops time at this budget (paired), for the speed comparison
                peer = [r for r in runs.get(key.replace("nethessian", "curvlinops"), []) if r["budget"] == b]
                if peer:
                    mine = {r["seed"]: r["time_s"] for r in rs}
                    ratios = [mine[p["seed"]] / p["time_s"] for p in peer if p["seed"] in mine]
                    d["time_vs_curvlinops_paired_median"] = statistics.median(ratios)
                    d["curvlinops_time_median_s"] = statistics.median(p["time_s"] for p in peer)
                    d["nethessian_time_same_seeds_median_s"] = statistics.median(
                        mine[p["seed"]] for p in peer if p["seed"] in mine)
            per[str(b)] = d
        summary[key] = per
    honesty = {}
    for meth in TRACE_METHODS:
        zs = [r["z"] for r in runs[f"nethessian {meth}"] if "z" in r]
        n = len(zs)
        honesty[meth] = {
            "n": n, "rms_z": math.sqrt(statistics.fmean(z * z for z in zs)) if zs else None,
            "mean_z": statistics.fmean(zs) if zs else None,
            "within_2_stderr": sum(abs(z) <= 2 for z in zs) / n if n else None,
            "within_3_stderr": sum(abs(z) <= 3 for z in zs) / n if n else None,
        }
    return {"reference": ref, "nethessian_batched_products": op._batched, "runs": runs, "summary": summary,
            "honesty": honesty}


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def _flag(r, text):
    load = r.get("others_cpu_cores_during")
    if load is not None and load > 0.3:
        return f"{text} (contended: others {load:.1f} cores)"
    return text


def eig_table(res):
    head = ("workload", "method", "time s", "matvecs", "rel. error of top-5 (worst seed)", "reached 1e-3?",
            "s per matvec (1 bare product)", "nethessian b=1 speed-up")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wl, r in res.items():
        for n, s in r["summary"].items():
            if "failed" in s:
                lines.append(f"| {wl} | {n} | failed: {s['failed'][:80]} | | | | | |")
                continue
            mv = s["matvecs_median"]
            mv = f"{mv:.0f}" if s["matvecs_max"] == mv else f"{mv:.0f} (max {s['matvecs_max']})"
            sp = s.get("nethessian_speedup")
            lines.append(
                f"| {wl} | {n} | {s['time_median_s']:.2f} | {mv} | {s['max_rel_error_worst']:.1e} | "
                f"{'yes' if s['reached_1e-3_all_seeds'] else '**no**'} | {s['seconds_per_matvec'] * 1e3:.1f} ms"
                + (f" ({s['product_s'] * 1e3:.1f} ms)" if "product_s" in s else "") + " | "
                + ("—" if n == "nethessian b=1" else (f"{sp:.2f}×" if sp is not None else "n/a")) + " |")
    return "\n".join(lines)


def trace_table(res):
    head = ("workload", "method", "matvecs", "seeds", "mean abs error (rel.)", "mean reported stderr", "RMS z",
            "|z|≤2", "nethessian time (all seeds)", "curvlinops seeds", "nethessian time (same seeds)",
            "curvlinops time", "curvlinops mean abs error", "nh / curvlinops time (paired)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wl, r in res.items():
        if "skipped" in r:
            lines.append(f"| {wl} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        tr = r["reference"]["value"]
        for meth in TRACE_METHODS:
            mine = r["summary"][f"nethessian {meth}"]
            peer = r["summary"].get(f"curvlinops {meth}", {})
            for b, d in mine.items():
                p = peer.get(b)
                ratio = d.get("time_vs_curvlinops_paired_median")
                same = d.get("nethessian_time_same_seeds_median_s")
                lines.append(
                    f"| {wl} | {meth} | {d['matvecs']:.0f} | {d['n']} | "
                    f"{d['mean_abs_error']:.3g} ({d['mean_abs_error'] / abs(tr):.1%}) | "
                    f"{d['mean_stderr']:.3g} | {d['rms_z']:.2f} | {d['within_2_stderr']:.0%} | "
                    f"{d['time_median_s']:.2f} s | " + (f"{p['n']}" if p else "0") + " | "
                    + (f"{same:.2f} s" if same is not None else "—") + " | "
                    + (f"{p['time_median_s']:.2f} s" if p else "—") + " | "
                    + (f"{p['mean_abs_error']:.3g}" if p else "—") + " | "
                    + (f"{ratio:.2f}" if ratio is not None else "—") + " |")
    return "\n".join(lines)


def targets(res_eig, res_trace):
    """The issue's targets, evaluated from the measurements.

    Eigenvalues: nethessian b=1 (the default) must reach 1e-3 on every seed and be
    ≥ 3x faster than (i) every eigsh configuration that reached 1e-3 (so the loosest
    eigsh tol that still got there is the comparator) and (ii) PyHessian at its
    defaults (the issue's definition, although PyHessian's defaults do not reach 1e-3);
    the fastest block size that reached 1e-3 is reported beside it.
    """
    out = []
    for wl, r in res_eig.items():
        s = r["summary"]
        nh1 = s.get("nethessian b=1", {})
        nh_ok = nh1.get("reached_1e-3_all_seeds", False)
        ok_nh = {n: x for n, x in s.items() if n.startswith("nethessian b=") and x.get("reached_1e-3_all_seeds")}
        best = min(ok_nh, key=lambda n: ok_nh[n]["time_median_s"], default=None)
        for label, pick in (
            ("scipy eigsh on curvlinops (fastest tol that reached 1e-3)",
             lambda n, x: n.startswith("eigsh") and "on curvlinops" in n and x["reached_1e-3_all_seeds"]),
            ("PyHessian at its defaults", lambda n, x: n == "PyHessian defaults"),
        ):
            peers = {n: x for n, x in s.items() if "time_median_s" in x and pick(n, x)}
            if not peers or not nh1.get("time_median_s"):
                out.append({"workload": wl, "target": f"≥{TARGET_SPEEDUP:g}× faster than {label}", "met": None,
                            "measured": "peer unavailable or failed"})
                continue
            pn = min(peers, key=lambda n: peers[n]["time_median_s"])
            pt = peers[pn]["time_median_s"]
            sp1 = pt / nh1["time_median_s"]
            spb = pt / ok_nh[best]["time_median_s"] if best else None
            out.append({
                "workload": wl, "target": f"top-5 to 1e-3 ≥{TARGET_SPEEDUP:g}× faster than {label}",
                "peer_config": pn, "peer_reached_1e-3": peers[pn]["reached_1e-3_all_seeds"],
                "peer_time_s": pt, "peer_matvecs": peers[pn]["matvecs_median"],
                "nethessian_time_s": nh1["time_median_s"], "nethessian_matvecs": nh1["matvecs_median"],
                "speedup_b1": sp1, "speedup_best_block": spb, "best_block": best,
                "met": bool(nh_ok and sp1 >= TARGET_SPEEDUP),
                "met_with_best_block": bool(spb is not None and spb >= TARGET_SPEEDUP),
            })
    for wl, r in res_trace.items():
        if "skipped" in r:
            continue
        for meth, d in r["honesty"].items():
            honest = d["rms_z"] is not None and d["rms_z"] <= 1.5 and d["within_2_stderr"] >= 0.8
            out.append({"workload": wl, "target": f"{meth} stderr honest (RMS z ≤ 1.5, ≥80% within 2 stderr)",
                        "rms_z": d["rms_z"], "within_2_stderr": d["within_2_stderr"], "n": d["n"], "met": honest})
        ratios = [(meth, b, d["time_vs_curvlinops_paired_median"]) for meth in TRACE_METHODS
                  for b, d in r["summary"][f"nethessian {meth}"].items() if "time_vs_curvlinops_paired_median" in d]
        if ratios:
            worst = max(ratios, key=lambda t: t[2])
            out.append({"workload": wl, "target": "trace no slower than curvlinops at equal matvecs",
                        "worst_ratio": worst[2], "worst_at": f"{worst[0]} {worst[1]}",
                        "median_ratio": statistics.median(t[2] for t in ratios),
                        "n_slower": sum(t[2] > 1.0 for t in ratios), "n": len(ratios), "met": worst[2] <= 1.0})
    return out


def targets_table(ts):
    lines = ["| workload | target | measured | met? |", "|---|---|---|---|"]
    for t in ts:
        if "speedup_b1" in t:
            m = (f"b=1 {t['nethessian_time_s']:.2f} s / {t['nethessian_matvecs']:.0f} Av vs {t['peer_config']} "
                 f"{t['peer_time_s']:.2f} s / {t['peer_matvecs']:.0f} Av"
                 + ("" if t["peer_reached_1e-3"] else " (did not reach 1e-3)") + f": **{t['speedup_b1']:.2f}×**")
            if t["best_block"] and t["best_block"] != "nethessian b=1":
                m += f"; fastest block ({t['best_block']}): {t['speedup_best_block']:.2f}×"
            met = "yes" if t["met"] else ("**no** (yes with block)" if t["met_with_best_block"] else "**no**")
        elif "rms_z" in t:
            m = f"RMS z {t['rms_z']:.2f}, {t['within_2_stderr']:.0%} within 2 stderr (n={t['n']})"
            met = "yes" if t["met"] else "**no**"
        elif "worst_ratio" in t:
            m = (f"nh/curvlinops time: median {t['median_ratio']:.2f}, worst {t['worst_ratio']:.2f} "
                 f"({t['worst_at']}); slower in {t['n_slower']} of {t['n']}")
            met = "yes" if t["met"] else "**no**"
        else:
            m, met = t.get("measured", ""), "n/a"
        lines.append(f"| {t['workload']} | {t['target']} | {m} | {met} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round, few seeds (smoke test)")
    ap.add_argument("--only", action="append", choices=["eig", "trace"], help="run only this part (repeatable)")
    ap.add_argument("--workloads", default="MLP,CNN", help="comma-separated: MLP, CNN (default both)")
    ap.add_argument("--rounds", type=int, default=None, help="eigenvalue rounds (seeds) per method (default 4; quick 1)")
    ap.add_argument("--blocks", default="1,4,8", help="nethessian block sizes (default 1,4,8; 1 is always run)")
    ap.add_argument("--pyhessian-tight", default="1e-5,1000", metavar="TOL,MAXITER",
                    help="extra PyHessian row with a tighter tol, to show what reaching 1e-3 costs it "
                         "(default 1e-5,1000; 'none' to skip)")
    ap.add_argument("--budgets", default=None, help="trace budgets in products (default 30,60,90,150; quick 30,90)")
    ap.add_argument("--seeds", type=int, default=None, help="trace seeds per method and budget (default 6; quick 2)")
    ap.add_argument("--curv-seeds", type=int, default=None,
                    help="of those, seeds also run through curvlinops (default 1)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/spectrum.json, "
                                                "spectrum_quick.json with --quick)")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"torch threads (default: the cores this process may use, {THREADS})")
    ap.add_argument("--wait-quiet", type=float, default=20.0, metavar="S",
                    help="before each section wait up to S seconds for other processes to use under 0.3 cores")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    parts = args.only or ["eig", "trace"]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; valid: {', '.join(WORKLOADS)}")
    rounds = args.rounds or (1 if args.quick else 4)
    seeds = args.seeds or (2 if args.quick else 6)
    curv_seeds = args.curv_seeds if args.curv_seeds is not None else 1
    budgets = [int(b) for b in (args.budgets or ("30,90" if args.quick else "30,60,90,150")).split(",")]
    blocks = sorted({1, *(int(b) for b in args.blocks.split(",") if b.strip())})
    tight = None
    if args.pyhessian_tight.lower() != "none":
        t, it = args.pyhessian_tight.split(",")
        tight = (float(t), int(it))
    out_path = Path(args.out) if args.out else HERE / "results" / ("spectrum_quick.json" if args.quick else "spectrum.json")

    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    mods, peer_status = import_peers(log)
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "nethessian": nh.__version__, "python": platform.python_version(),
        "numpy": np.__version__, "scipy": importlib.metadata.version("scipy"),
        "platform": platform.platform(), "torch_threads": torch.get_num_threads(), "cpu_affinity": THREADS,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "quick": args.quick, "parts": parts, "workloads": {w: WORKLOADS[w][0] for w in workloads},
        "peers": peer_status,
        "settings": {"rounds": rounds, "blocks": blocks, "pyhessian_tight": tight, "budgets": budgets,
                     "seeds": seeds, "curv_seeds": curv_seeds, "k": K, "tol": TARGET_ACC},
    }
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; peers: "
        + ", ".join(f"{m} {s.get('version', '')}{'' if s['ok'] else ' (UNAVAILABLE)'}" for m, s in peer_status.items()))
    contention = meta["others_cpu_cores"] = {}

    def section(key, fn):
        return measured_section(key, fn, contention, args.wait_quiet, log)

    res_eig, res_trace = {}, {}
    if "eig" in parts:
        for wl in workloads:
            pb = EigProblem(wl, mods)
            res_eig[wl] = section(f"eig/{wl}", lambda: run_eig(pb, rounds, blocks, tight, log))
    if "trace" in parts:
        for wl in workloads:
            res_trace[wl] = section(f"trace/{wl}", lambda: run_trace(wl, mods, budgets, seeds, curv_seeds, log))
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]

    ts = targets(res_eig, res_trace)
    tables = []
    if res_eig:
        tables.append("### Top-5 eigenvalues to 1e-3 (medians over seeds; speed-up = method time / nethessian b=1 time)\n\n"
                      + eig_table(res_eig))
    if res_trace:
        tables.append("### Trace: error vs products (reference: BackPACK exact diagonal, summed)\n\n" + trace_table(res_trace))
    if ts:
        tables.append("### Targets\n\n" + targets_table(ts))
    flags = [f"{k}: others used {v['during']:.1f} cores" for k, v in contention.items() if v["during"] > 0.3]
    if flags:
        tables.append("Contended sections (treat times as qualitative): " + "; ".join(flags))
    text = "\n\n".join(tables)
    print(text)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": meta, "eig": res_eig, "trace": res_trace, "targets": ts,
                                    "table": text}, indent=1, default=float))
    log(f"wrote {out_path}")
    ok = all(r["reference"]["cross_check_ok"] for r in res_eig.values())
    ok = ok and all(r["reference"]["entry_check_ok"] for r in res_trace.values() if "reference" in r)
    if not ok:
        log("REFERENCE CHECK FAILED: see eig.*.reference.cross_check_rel / trace.*.reference.entry_check_rel")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
