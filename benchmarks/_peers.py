"""bench_spectrum's peers (PyHessian, hessian-eigenthings, curvlinops, BackPACK) and the
top-5 eigenvalue runs of nethessian and of each peer, with their products counted.

Every method runs end to end (operator built inside) and returns a dict with at least
``eigenvalues``, ``matvecs``, ``setup_s``, ``solve_s`` and ``time_s``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import math
import sys
import time
import warnings

import numpy as np
import torch

import nethessian as nh

from _workloads import make_workload

K = 5  # eigenvalues wanted
TARGET_ACC = 1e-3  # relative accuracy of the top-5 asked for
REF_AGREE = 1e-5  # float64 eigsh reference vs nethessian tol=1e-8 (float32 products)

PEERS = {  # import name -> distribution name
    "curvlinops": "curvlinops-for-pytorch",
    "pyhessian": "pyhessian",
    "hessian_eigenthings": "hessian-eigenthings",
    "backpack": "backpack-for-pytorch",
}

__all__ = [
    "K",
    "TARGET_ACC",
    "REF_AGREE",
    "PEERS",
    "import_peers",
    "Count",
    "count_curvlinops",
    "rel_errors",
    "EigProblem",
]


def _import_peer(mod, mods):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mods[mod] = importlib.import_module(mod)
        if mod == "pyhessian":  # the module object (the package re-exports the class `hessian`)
            importlib.import_module("pyhessian.hessian")
            mods["pyhessian.hessian"] = sys.modules["pyhessian.hessian"]


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
            _import_peer(mod, mods)
            status[mod] = {"ok": True, "version": version}
        except Exception as exc:  # noqa: BLE001 - any import failure is recorded
            status[mod] = {"ok": False, "version": version, "why": f"{type(exc).__name__}: {exc}"}
            log(f"peer {mod}: import failed: {exc}")
    return mods, status


# ----------------------------------------------------------------------------------------
# product counting
# ----------------------------------------------------------------------------------------
class Count:
    def __init__(self):
        self.n = 0


def counting(fn, c, columns=lambda *a, **kw: 1):
    """``fn`` wrapped to add ``columns(*args)`` to ``c.n`` at every call."""

    def counted(*a, **kw):
        c.n += columns(*a, **kw)
        return fn(*a, **kw)

    return counted


def count_curvlinops(H):
    """Count the columns every product of a curvlinops operator applies (its ``_matmat``)."""
    c = Count()
    # instance attribute shadows the method; __matmul__ calls self._matmat
    H._matmat = counting(H._matmat, c, lambda M: int(M[0].shape[-1]))
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


def _timed(c, t0, t1, t2, eigenvalues):
    return {"eigenvalues": eigenvalues, "matvecs": c.n, "setup_s": t1 - t0, "solve_s": t2 - t1, "time_s": t2 - t0}


# ----------------------------------------------------------------------------------------
# (a) top-5 eigenvalues: one callable per method, each run end to end (operator built inside)
# ----------------------------------------------------------------------------------------
class EigProblem:
    def __init__(self, name, mods):
        self.name = name
        self.model, self.loss_fn, self.X, self.y = make_workload(name)
        self.P = sum(p.numel() for p in self.model.parameters())
        self.mods = mods

    def nh_op(self):
        return nh.HessianOperator(self.model, self.loss_fn, (self.X, self.y))

    # --- nethessian -------------------------------------------------------------------
    def nh(self, seed, *, block_size=1, tol=TARGET_ACC):
        t0 = time.perf_counter()
        op = self.nh_op()
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = nh.eigenvalues(op, k=K, which="largest", tol=tol, seed=seed, block_size=block_size)
        t2 = time.perf_counter()
        return {
            "eigenvalues": r.eigenvalues.tolist(),
            "matvecs": int(r.num_matvecs),
            "setup_s": t1 - t0,
            "solve_s": t2 - t1,
            "time_s": t2 - t0,
            "converged": bool(r.converged),
            "residuals": r.residuals.tolist(),
            "warnings": [str(w.message) for w in caught],
        }

    # --- scipy eigsh -----------------------------------------------------------------------
    def _eigsh(self, L, c, seed, tol, t0, t1):
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).standard_normal(L.shape[0])
        w, _ = eigsh(L, k=K, which="LA", tol=tol, v0=v0)
        return _timed(c, t0, t1, time.perf_counter(), np.sort(w)[::-1].tolist())

    def curvlinops_op(self, model=None):
        cl = self.mods["curvlinops"]
        model = model or self.model
        # check_deterministic=False: the default check spends extra products at construction
        return cl.HessianLinearOperator(
            model,
            self.loss_fn,
            [p for p in model.parameters()],
            [(self.X if model is self.model else self.X.double(), self.y)],
            check_deterministic=False,
        )

    def eigsh_curvlinops(self, seed, *, tol, model=None):
        t0 = time.perf_counter()
        H = self.curvlinops_op(model)
        c = count_curvlinops(H)
        L = counting_scipy(H.to_scipy(), None)
        t1 = time.perf_counter()
        return self._eigsh(L, c, seed, tol, t0, t1)

    def eigsh_nethessian(self, seed, *, tol):
        t0 = time.perf_counter()
        op = self.nh_op()
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
        kw = {}
        if tol is not None:
            kw["tol"] = tol
        if max_iter is not None:
            kw["maxIter"] = max_iter
        phm.hessian_vector_product = counting(inner, c)
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
        return _timed(c, t0, t1, t2, [float(x) for x in ev])

    # --- hessian-eigenthings ------------------------------------------------------------------
    def eigenthings_op(self, model):
        """hessian-eigenthings' operator on ``model`` (a copy: it leaves state on the model)."""
        he = self.mods["hessian_eigenthings"]
        return he.HessianOperator(model, [(self.X, self.y)], he.supervised_loss(self.loss_fn))

    def eigenthings(self, seed):
        he = self.mods["hessian_eigenthings"]
        model = copy.deepcopy(self.model)
        c = Count()
        t0 = time.perf_counter()
        hop = self.eigenthings_op(model)
        hop.matvec = counting(hop.matvec, c)
        t1 = time.perf_counter()
        res = he.lanczos(hop, k=K, seed=seed)  # defaults: which="LM", max_iter=2k, tol=1e-4
        out = _timed(c, t0, t1, time.perf_counter(), res.eigenvalues.double().tolist())
        out.update(iterations=int(res.iterations), self_reported_converged=res.converged.tolist())
        return out

    # --- reference ---------------------------------------------------------------------------
    def reference(self, log):
        """float64 eigsh (tol 1e-10) on curvlinops' operator of a float64 copy; nethessian tol 1e-8 as a check."""
        out = {}
        if "curvlinops" in self.mods:
            m64 = copy.deepcopy(self.model).double()
            out["float64 eigsh tol=1e-10 (curvlinops operator)"] = self.eigsh_curvlinops(12345, tol=1e-10, model=m64)
        out["nethessian tol=1e-8 (float32)"] = self.nh(12345, tol=1e-8)
        names = list(out)
        ref = out[names[0]]["eigenvalues"]
        agree = max(rel_errors(out[names[-1]]["eigenvalues"], ref)) if len(names) > 1 else None
        log(
            f"  [{self.name}] reference ({names[0]}): "
            + ", ".join(f"{x:.8g}" for x in ref)
            + (f"; nethessian tol=1e-8 agrees to {agree:.1e}" if agree is not None else "")
        )
        return {
            "eigenvalues": ref,
            "source": names[0],
            "runs": out,
            "cross_check_rel": agree,
            "cross_check_ok": agree is None or agree <= REF_AGREE,
        }
