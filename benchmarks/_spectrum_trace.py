"""bench_spectrum's part (b): trace error against products, nethessian's Hutchinson,
Hutch++ and XTrace (and curvlinops' at the same budgets for time), against BackPACK's
exact Hessian diagonal summed.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
import warnings

import torch

import nethessian as nh

from _peers import count_curvlinops
from _timing import rotated
from _workloads import make_workload

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
CURV_TRACE = {"hutchinson": "hutchinson_trace", "hutch++": "hutchpp_trace", "xtrace": "xtrace"}
DIAG_CHECK = 1e-4  # BackPACK diagonal entries vs e_i^T H e_i, relative to max |diag|

__all__ = ["TRACE_METHODS", "backpack_reference", "run_trace"]


def _entry_check(model, loss_fn, X, y, diag):
    """Max |e_iᵀ H e_i − diag_i| / max |diag| over 32 random coordinates, through nethessian."""
    P = diag.numel()
    idx = torch.randperm(P, generator=torch.Generator().manual_seed(7))[:32]
    E = torch.zeros(P, idx.numel(), dtype=X.dtype)
    E[idx, torch.arange(idx.numel())] = 1
    direct = (nh.HessianOperator(model, loss_fn, (X, y)) @ E)[idx, torch.arange(idx.numel())]
    return float((direct.double() - diag[idx].double()).abs().max() / diag.double().abs().max())


def backpack_reference(model, loss_fn, X, y, mods, log, name):
    """The exact trace: BackPACK's ``DiagHessian`` summed in float64, its entries spot-checked."""
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
    check = _entry_check(model, loss_fn, X, y, diag)
    value = float(diag.double().sum())
    log(
        f"  [{name}] BackPACK DiagHessian trace {value:.8g} ({dt:.2f} s); 32 entries vs e_i^T H e_i: "
        f"max diff {check:.1e} of max |diag|"
    )
    return {"value": value, "time_s": dt, "entry_check_rel": check, "entry_check_ok": check <= DIAG_CHECK}


class _Estimators:
    """nethessian's operator and (if installed) curvlinops', warmed up, with one estimate each."""

    def __init__(self, model, loss_fn, X, y, mods, budgets):
        self.mods = mods
        self.op = nh.HessianOperator(model, loss_fn, (X, y))
        self.H = self.hc = None
        if "curvlinops" in mods:
            self.H = mods["curvlinops"].HessianLinearOperator(
                model, loss_fn, list(model.parameters()), [(X, y)], check_deterministic=False
            )
            self.hc = count_curvlinops(self.H)
        # warm-up: builds nethessian's kept graph and its batched/loop decision; vmap set-up of curvlinops
        # nethessian decides batched-vs-loop products on its first (P, k) call: make that a realistic one
        nh.trace(self.op, method="hutchinson", num_matvecs=min(budgets), seed=999)
        for meth in TRACE_METHODS:
            nh.trace(self.op, method=meth, num_matvecs=6, seed=999)
            if self.H is not None:
                getattr(mods["curvlinops"], CURV_TRACE[meth])(self.H, 6)

    def nethessian(self, meth, budget, seed):
        t0 = time.perf_counter()
        est = nh.trace(self.op, method=meth, num_matvecs=budget, seed=seed)
        dt = time.perf_counter() - t0
        return {
            "seed": seed,
            "budget": budget,
            "value": est.value,
            "stderr": est.stderr,
            "matvecs": int(est.num_matvecs),
            "time_s": dt,
        }

    def curvlinops(self, meth, budget, seed):
        fn = getattr(self.mods["curvlinops"], CURV_TRACE[meth])
        torch.manual_seed(seed)  # curvlinops draws probes from torch's global RNG
        self.hc.n = 0
        t0 = time.perf_counter()
        val = float(fn(self.H, budget))
        dt = time.perf_counter() - t0
        return {"seed": seed, "budget": budget, "value": val, "stderr": None, "matvecs": self.hc.n, "time_s": dt}


def _score(row, tr):
    """Add the estimate's error (absolute, relative) and its z = error / reported stderr."""
    row["abs_error"] = abs(row["value"] - tr)
    row["rel_error"] = row["abs_error"] / abs(tr)
    if row["stderr"]:
        row["z"] = (row["value"] - tr) / row["stderr"]
    return row


def _trace_rounds(est, name, budgets, seeds, curv_seeds, tr, log):
    """Every seed × budget × method, methods rotating; curvlinops beside nethessian, who goes first alternating."""
    runs = {f"nethessian {m}": [] for m in TRACE_METHODS}
    if est.H is not None:
        runs.update({f"curvlinops {m}": [] for m in TRACE_METHODS})
    k = 0
    for seed in range(seeds):
        for m_budget in budgets:
            gc.collect()
            order = rotated(TRACE_METHODS, k)
            k += 1
            for meth in order:
                who_order = ["nethessian"] + (["curvlinops"] if est.H is not None and seed < curv_seeds else [])
                if k % 2:
                    who_order.reverse()  # alternate who goes first
                for who in who_order:
                    runs[f"{who} {meth}"].append(_score(getattr(est, who)(meth, m_budget, seed), tr))
            log(
                f"  [{name}] seed {seed} budget {m_budget}: "
                + ", ".join(
                    f"{meth} {runs[f'nethessian {meth}'][-1]['value']:.4g}"
                    f"±{runs[f'nethessian {meth}'][-1]['stderr']:.2g}"
                    for meth in TRACE_METHODS
                )
                + f" (ref {tr:.6g})"
            )
    return runs


def _rms(xs):
    return math.sqrt(statistics.fmean(x * x for x in xs))


def _vs_curvlinops(d, rs, peer):
    """Same-seed curvlinops time at this budget (paired), for the speed comparison."""
    mine = {r["seed"]: r["time_s"] for r in rs}
    ratios = [mine[p["seed"]] / p["time_s"] for p in peer if p["seed"] in mine]
    d["time_vs_curvlinops_paired_median"] = statistics.median(ratios)
    d["curvlinops_time_median_s"] = statistics.median(p["time_s"] for p in peer)
    d["nethessian_time_same_seeds_median_s"] = statistics.median(mine[p["seed"]] for p in peer if p["seed"] in mine)


def _budget_summary(key, rs, runs, b):
    d = {
        "n": len(rs),
        "matvecs": statistics.median(r["matvecs"] for r in rs),
        "mean_abs_error": statistics.fmean(r["abs_error"] for r in rs),
        "rmse": _rms([r["abs_error"] for r in rs]),
        "time_median_s": statistics.median(r["time_s"] for r in rs),
    }
    if key.startswith("nethessian"):
        zs = [r["z"] for r in rs if "z" in r]
        d["mean_stderr"] = statistics.fmean(r["stderr"] for r in rs)
        d["rms_stderr"] = _rms([r["stderr"] for r in rs])
        d["rms_z"] = _rms(zs) if zs else None
        d["within_2_stderr"] = sum(abs(z) <= 2 for z in zs) / len(zs) if zs else None
        peer = [r for r in runs.get(key.replace("nethessian", "curvlinops"), []) if r["budget"] == b]
        if peer:
            _vs_curvlinops(d, rs, peer)
    return d


def _summaries(runs, budgets):
    """Per method and budget: errors, stderrs, z and times."""
    summary = {}
    for key, rows in runs.items():
        per = {}
        for b in budgets:
            rs = [r for r in rows if r["budget"] == b]
            if rs:
                per[str(b)] = _budget_summary(key, rs, runs, b)
        summary[key] = per
    return summary


def _honesty(runs):
    """Per method, pooled over budgets and seeds: is the reported stderr honest (z ~ N(0, 1))?"""
    honesty = {}
    for meth in TRACE_METHODS:
        zs = [r["z"] for r in runs[f"nethessian {meth}"] if "z" in r]
        n = len(zs)
        honesty[meth] = {
            "n": n,
            "rms_z": _rms(zs) if zs else None,
            "mean_z": statistics.fmean(zs) if zs else None,
            "within_2_stderr": sum(abs(z) <= 2 for z in zs) / n if n else None,
            "within_3_stderr": sum(abs(z) <= 3 for z in zs) / n if n else None,
        }
    return honesty


def run_trace(name, mods, budgets, seeds, curv_seeds, log):
    """Part (b) on one workload; skipped (and said why) without BackPACK."""
    model, loss_fn, X, y = make_workload(name)
    if "backpack" not in mods:
        return {"skipped": "BackPACK not available: no reference trace"}
    ref = backpack_reference(model, loss_fn, X, y, mods, log, name)
    est = _Estimators(model, loss_fn, X, y, mods, budgets)
    runs = _trace_rounds(est, name, budgets, seeds, curv_seeds, ref["value"], log)
    return {
        "reference": ref,
        "nethessian_batched_products": est.op.batched,
        "runs": runs,
        "summary": _summaries(runs, budgets),
        "honesty": _honesty(runs),
    }
