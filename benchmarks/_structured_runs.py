"""bench_structured's parts 1–3: the exact diagonal and the exact trace, against one gradient.

Every method runs in the same process, timed round-robin (``_timing.bench_interleaved``)
with a plain-autograd gradient of the same model and loss as the unit.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch

import nethessian as nh

from _timing import bench_interleaved, gradient_ratios
from _workloads import rel_err

TOL_DIAG = 1e-4  # float32 diagonals of different methods vs nethessian's, relative (norm-wise)
HUTCH_MATVECS = 90

__all__ = ["HUTCH_MATVECS", "TOL_DIAG", "workloads", "run_diagonal", "run_trace"]


def workloads(quick):
    """``{name: (description, builder)}``: the issue's MLP and CNN (smaller N with ``quick``)."""
    n_mlp, n_cnn = (64, 16) if quick else (1024, 256)
    return {
        "MLP": (f"MLP 784-128-64-10 tanh, CE, N={n_mlp} (P=109,386)", lambda: nh.examples.mlp(n=n_mlp)),
        "CNN": (f"CNN conv 1→8→16, ReLU, max-pool, linear, CE, N={n_cnn} (P=5,258)", lambda: nh.examples.cnn(n=n_cnn)),
    }


def _gradient(model, loss_fn, X, y):
    params = list(model.parameters())

    def gradient():
        return torch.autograd.grad(loss_fn(model(X), y), params)

    return gradient


def _backpack(model, loss_fn, X, y):
    """BackPACK's exact diagonal (``extend`` + ``DiagHessian``) on deep copies, flat (P,)."""
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    bm, bl = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    params = list(bm.parameters())

    def diag():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Full backward hook is firing ..." (inputs need no grad)
            with backpack(DiagHessian()):
                bl(bm(X), y).backward()
        out = torch.cat([p.diag_h.reshape(-1) for p in params])
        for p in params:
            p.grad = None
        return out

    return diag


def _columns(op, cols):
    """``H e_i`` for the chosen indices ``cols`` (one product per column, as ``P`` columns would be)."""
    E = torch.zeros(op.shape[0], len(cols), dtype=op.dtype)
    E[cols, torch.arange(len(cols))] = 1

    def columns():
        return op @ E

    return columns


def _structured_diagonal(op):
    def structured():
        d = nh.diagonal(op, method="exact", engine="structured", progress=False)
        assert d.engine == "structured", d.engine_reason
        return d.values

    return structured


def run_diagonal(build, cfg, log):
    """Exact diagonal: nethessian structured vs BackPACK vs column-by-column autodiff (extrapolated)."""
    model, loss_fn, (X, y) = build()
    op = nh.HessianOperator(model, loss_fn, (X, y))
    P, c = op.shape[0], cfg["columns"]
    cols = torch.randperm(P, generator=torch.Generator().manual_seed(0))[:c].sort().values
    fns = {
        "gradient": _gradient(model, loss_fn, X, y),
        "nethessian structured": _structured_diagonal(op),
        "BackPACK DiagHessian": _backpack(model, loss_fn, X, y),
        f"autodiff {c} columns": _columns(op, cols),
    }
    ref = fns["nethessian structured"]()
    errors = {
        "BackPACK DiagHessian": rel_err(fns["BackPACK DiagHessian"](), ref),
        "autodiff columns": rel_err(fns[f"autodiff {c} columns"]()[cols, torch.arange(c)], ref[cols]),
    }
    log("  diagonal rel errors vs nethessian: " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    med, samples, inner, paired = bench_interleaved(fns, cfg["reps"], cfg["sample_s"], log)
    ratios = gradient_ratios(med, samples, paired)
    g = ratios["in_gradients"]
    extrapolated = g[f"autodiff {c} columns"] * P / c
    log(
        f"  structured {g['nethessian structured']:.2f}, BackPACK {g['BackPACK DiagHessian']:.2f}, "
        f"autodiff (P={P} columns, extrapolated from {c}) {extrapolated:.0f} gradients"
    )
    return {
        "P": P,
        "columns_timed": c,
        "median_s": med,
        "inner_counts": inner,
        **ratios,
        "autodiff_P_columns_in_gradients_extrapolated": extrapolated,
        "autodiff_P_columns_s_extrapolated": med[f"autodiff {c} columns"] * P / c,
        "rel_err_vs_nethessian": errors,
        "correct": max(errors.values()) <= TOL_DIAG,
    }


def _trace_fns(op, model, loss_fn, X, y):
    def exact():
        t = nh.trace(op, exact=True, progress=False)
        return t.value, t.engine

    def hutch():
        return nh.trace(op, method="hutch++", num_matvecs=HUTCH_MATVECS, seed=0, progress=False).value

    return {"gradient": _gradient(model, loss_fn, X, y), "exact trace": exact, "Hutch++ 90": hutch}


def run_trace(build, cfg, log):
    """Exact trace (``nh.trace(op, exact=True)``) vs Hutch++ at 90 products: time and Hutch++'s error."""
    model, loss_fn, (X, y) = build()
    op = nh.HessianOperator(model, loss_fn, (X, y))
    fns = _trace_fns(op, model, loss_fn, X, y)
    exact, engine = fns["exact trace"]()
    ests = [
        nh.trace(op, method="hutch++", num_matvecs=HUTCH_MATVECS, seed=s, progress=False) for s in range(cfg["seeds"])
    ]
    errs = [(e.value - exact) / abs(exact) for e in ests]
    rms = math.sqrt(sum(e * e for e in errs) / len(errs))
    backpack_sum = float(_backpack(model, loss_fn, X, y)().double().sum())
    check = abs(backpack_sum - exact) / abs(exact)
    log(
        f"  exact trace {exact:.6g} (engine {engine}; BackPACK diagonal sum rel diff {check:.1e}); "
        f"Hutch++ {HUTCH_MATVECS} RMS rel error {rms:.2e} over {len(errs)} seeds"
    )
    med, samples, inner, paired = bench_interleaved(fns, cfg["trace_reps"], cfg["sample_s"], log)
    ratios = gradient_ratios(med, samples, paired)
    return {
        "exact_value": exact,
        "exact_engine": engine,
        "backpack_diag_sum_rel_diff": check,
        "hutchpp_values": [e.value for e in ests],
        "hutchpp_stderrs": [e.stderr for e in ests],
        "hutchpp_rel_errors": errs,
        "hutchpp_rms_rel_error": rms,
        "median_s": med,
        "inner_counts": inner,
        **ratios,
        "correct": check <= TOL_DIAG,
    }
