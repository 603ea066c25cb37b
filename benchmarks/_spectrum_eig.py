"""bench_spectrum's part (a): top-5 eigenvalues to 1e-3, nethessian against its peers."""

from __future__ import annotations

import copy
import gc
import statistics
import sys
import time
import traceback
import warnings

import torch

from _peers import K, TARGET_ACC, EigProblem, rel_errors
from _timing import rotated

__all__ = ["eig_methods", "warm_up_eig", "engine_of", "own_work", "product_costs", "run_eig"]

OWN_WORK_TARGET = 0.20  # the eigensolver's own work, as a fraction of its products' time


def eig_methods(pb: EigProblem, blocks, pyhessian_tight):
    """name -> (callable(seed), description). Peers that failed to import are left out."""
    m = {}
    for b in blocks:
        m[f"nethessian b={b}"] = (
            lambda s, b=b: pb.nh(s, block_size=b),
            f"nh.eigenvalues(k=5, tol=1e-3, block_size={b}), fresh HessianOperator",
        )
    if "curvlinops" in pb.mods:
        m["eigsh tol=1e-3 on curvlinops"] = (
            lambda s: pb.eigsh_curvlinops(s, tol=1e-3),
            "scipy eigsh(k=5, which='LA', tol=1e-3) on HessianLinearOperator.to_scipy()",
        )
        m["eigsh tol=1e-2 on curvlinops"] = (
            lambda s: pb.eigsh_curvlinops(s, tol=1e-2),
            "same, tol=1e-2 (looser; still reached 1e-3 in tests)",
        )
    m["eigsh tol=1e-3 on nethessian"] = (
        lambda s: pb.eigsh_nethessian(s, tol=1e-3),
        "diagnostic: scipy eigsh tol=1e-3 on nethessian's op.to_scipy()",
    )
    if "pyhessian" in pb.mods:
        m["PyHessian defaults"] = (
            lambda s: pb.pyhessian(s),
            "hessian(model, criterion, data, cuda=False).eigenvalues(top_n=5): power iteration, tol=1e-3, maxIter=100",
        )
        if pyhessian_tight:
            tol, it = pyhessian_tight
            m[f"PyHessian tol={tol:g}"] = (
                lambda s: pb.pyhessian(s, tol=tol, max_iter=it),
                f"same, tol={tol:g}, maxIter={it} (tightened to try to reach 1e-3)",
            )
    if "hessian_eigenthings" in pb.mods:
        m["hessian-eigenthings defaults"] = (
            lambda s: pb.eigenthings(s),
            "lanczos(HessianOperator, k=5): defaults which='LM', max_iter=2k=10",
        )
    return m


def warm_up_eig(pb: EigProblem):
    """One product through every engine (first-call costs: autograd, vmap/jacrev setup)."""
    v = torch.randn(pb.P, dtype=pb.X.dtype)
    pb.nh_op() @ v
    if "curvlinops" in pb.mods:
        H = pb.curvlinops_op()
        H @ v
        H @ torch.randn(pb.P, 3, dtype=pb.X.dtype)
    if "hessian_eigenthings" in pb.mods:
        pb.eigenthings_op(copy.deepcopy(pb.model)).matvec(v)


ENGINE = {  # which product engine each method's products go through (for the product-time share)
    "nethessian": "nethessian operator",
    "eigsh tol=1e-3 on nethessian": "nethessian operator",
    "eigsh": "curvlinops jvp(jacrev)",
    "PyHessian": "PyHessian kept graph",
    "hessian-eigenthings": "hessian-eigenthings graph rebuilt",
}


def engine_of(name):
    for prefix, eng in sorted(ENGINE.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix):
            return eng
    return None


def _product_fns(pb: EigProblem, v):
    """name -> one single-vector product through each engine (and one gradient)."""
    ps = list(pb.model.parameters())
    fns = {"gradient": lambda: torch.autograd.grad(pb.loss_fn(pb.model(pb.X), pb.y), ps)}
    op = pb.nh_op()
    fns["nethessian operator"] = lambda: op @ v
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
        hop = pb.eigenthings_op(copy.deepcopy(pb.model))
        fns["hessian-eigenthings graph rebuilt"] = lambda: hop.matvec(v)
    return fns


def product_costs(pb: EigProblem, reps, log):
    """Median seconds of one single-vector product through each engine (interleaved), and one gradient."""
    v = torch.randn(pb.P, generator=torch.Generator().manual_seed(3), dtype=pb.X.dtype)
    fns = _product_fns(pb, v)
    samples = {n: [] for n in fns}
    for f in fns.values():
        f()
    for r in range(reps):
        for n in rotated(fns, r):
            t0 = time.perf_counter()
            for _ in range(3):
                fns[n]()
            samples[n].append((time.perf_counter() - t0) / 3)
    med = {n: statistics.median(x) for n, x in samples.items()}
    log(f"  [{pb.name}] one product: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in med.items()))
    return {"median_s": med, "in_gradients": {n: t / med["gradient"] for n, t in med.items()}}


def _eig_rounds(pb: EigProblem, methods, rounds, ref, log):
    """``rounds`` runs of every method (seed = round), in rotating order; failures recorded."""
    runs = {n: [] for n in methods}
    failures = {}
    for r in range(rounds):
        gc.collect()
        for n in rotated(methods, r):
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
            log(
                f"  [{pb.name}] round {r} {n:<32} {out['time_s']:7.3f} s {out['matvecs']:5d} Av  "
                f"max rel err {out['max_rel_error']:.1e}"
            )
    return runs, failures


def _summarise(rs, description, eng, costs):
    """Medians over seeds of one method's runs; with the product-time share of its engine."""
    s = {
        "description": description,
        "time_median_s": statistics.median(x["time_s"] for x in rs),
        "setup_median_s": statistics.median(x["setup_s"] for x in rs),
        "matvecs_median": statistics.median(x["matvecs"] for x in rs),
        "matvecs_max": max(x["matvecs"] for x in rs),
        "max_rel_error_worst": max(x["max_rel_error"] for x in rs),
        "max_rel_error_median": statistics.median(x["max_rel_error"] for x in rs),
        "reached_1e-3_all_seeds": all(x["max_rel_error"] <= TARGET_ACC for x in rs),
        "seconds_per_matvec": statistics.median(x["solve_s"] / max(x["matvecs"], 1) for x in rs),
    }
    if eng in costs["median_s"]:
        # share of the solve spent in products, at the engine's bare single-vector cost
        t1 = costs["median_s"][eng]
        s["engine"] = eng
        s["product_s"] = t1
        s["product_share"] = statistics.median(x["matvecs"] * t1 / x["solve_s"] for x in rs)
        s["non_product_s_per_matvec"] = s["seconds_per_matvec"] - t1
    return s


def _add_speedups(summary, runs, base="nethessian b=1"):
    """Each method's median time over nethessian b=1's, and the median per-round ratio."""
    if not runs.get(base):
        return
    tb = summary[base]["time_median_s"]
    by_seed = {y["seed"]: y["time_s"] for y in runs[base]}
    for n, s in summary.items():
        if "time_median_s" in s:
            s["nethessian_speedup"] = s["time_median_s"] / tb
            # per-round (paired) ratio: same round, same load
            paired = [x["time_s"] / by_seed[x["seed"]] for x in runs[n] if x["seed"] in by_seed]
            s["nethessian_speedup_paired_median"] = statistics.median(paired)


def own_work(pb: EigProblem, seeds, log):
    """nethessian b=1's own work (everything but the products) over its products' time, instrumented.

    Every product is timed where it runs (``profile_lanczos.instrumented``), so the split
    does not rest on a bare-product estimate; medians over ``seeds`` runs.
    """
    from profile_lanczos import one_run

    runs = [one_run(pb.model, pb.loss_fn, pb.X, pb.y, s, K, TARGET_ACC, 1, {}) for s in range(seeds)]
    frac = statistics.median(r["own_sum"] / r["products"] for r in runs)
    phases = {p: statistics.median(r["own"][p] for r in runs) for p in runs[0]["own"]}
    out = {
        "own_over_products_median": frac,
        "products_s_median": statistics.median(r["products"] for r in runs),
        "own_s_median": statistics.median(r["own_sum"] for r in runs),
        "own_by_phase_s_median": phases,
        "matvecs": [r["matvecs"] for r in runs],
        "target": OWN_WORK_TARGET,
        "met": frac < OWN_WORK_TARGET,
    }
    log(
        f"  [{pb.name}] nethessian b=1 own work {out['own_s_median']:.3f} s = {frac:.1%} of its products' "
        f"{out['products_s_median']:.3f} s (" + ", ".join(f"{p} {t:.3f}" for p, t in phases.items()) + ")"
    )
    return out


def run_eig(pb: EigProblem, rounds, blocks, pyhessian_tight, log):
    """Part (a) on one workload: reference, warm-up, bare product costs, rounds, summaries."""
    ref = pb.reference(log)
    warm_up_eig(pb)
    costs = product_costs(pb, 5 if rounds > 1 else 3, log)
    methods = eig_methods(pb, blocks, pyhessian_tight)
    runs, failures = _eig_rounds(pb, methods, rounds, ref, log)
    summary = {}
    for n, rs in runs.items():
        if not rs:
            summary[n] = {"failed": failures.get(n, "no run")}
            continue
        summary[n] = _summarise(rs, methods[n][1], engine_of(n), costs)
    _add_speedups(summary, runs)
    own = own_work(pb, max(3, rounds), log)
    return {
        "reference": ref,
        "product_costs": costs,
        "runs": runs,
        "summary": summary,
        "failures": failures,
        "own_work": own,
    }
