"""bench_core's parts 1 and 2: one HVP, and 32 HVPs at once, against one gradient."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from _timing import bench_interleaved, gradient_ratios, time_calls
from _workloads import K_BATCH, Problem, rel_err

TOL_HVP = 1e-3  # float32 products vs a float64 double-backward reference (relative, norm-wise)

__all__ = ["TOL_HVP", "run_hvp", "run_batch"]


def _log_errors(pb, what, errs, log):
    log(f"  [{pb.name}] {what} rel errors vs float64: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))


# ----------------------------------------------------------------------------------------
# 1. one HVP vs one gradient
# ----------------------------------------------------------------------------------------
def _first_calls(pb: Problem, first_reps):
    """First product of fresh operators (builds the kept graph); construction timed apart."""
    first, construct, grad_first = [], [], []
    for _ in range(first_reps):
        gc.collect()
        t0 = time.perf_counter()
        fresh = pb.nh_operator()
        construct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fresh @ pb.v
        first.append(time.perf_counter() - t0)
        del fresh
        grad_first.append(time_calls(pb.gradient, 3))
    return {
        "first_call_s": first,
        "first_call_median_s": statistics.median(first),
        "construct_s": construct,
        "construct_median_s": statistics.median(construct),
        "gradient_during_first_s": grad_first,
    }


def run_hvp(pb: Problem, reps, sample_s, first_reps, log):
    """One steady-state HVP of each method, in gradients; correctness checked first."""
    op = pb.nh_operator()
    ref = pb.reference_hvp(pb.v)
    ps, g = pb.raw_kept_graph()

    def raw_kept():
        return torch.autograd.grad(g, ps, pb.v_list, retain_graph=True)

    fns = {
        "gradient": pb.gradient,
        "nethessian": lambda: op @ pb.v,
        "torch.func jvp(grad)": lambda: pb.func_hvp(pb.v_dict),
        "double backward rebuilt": lambda: pb.db_rebuilt(pb.v_list),
        "raw kept graph (plain torch)": raw_kept,
    }
    # correctness first: numbers never come from a wrong computation
    errs = {
        "nethessian": rel_err(op @ pb.v, ref),
        "torch.func jvp(grad)": rel_err(pb.flat(pb.func_hvp(pb.v_dict).values()), ref),
        "double backward rebuilt": rel_err(pb.flat(pb.db_rebuilt(pb.v_list)), ref),
        "raw kept graph (plain torch)": rel_err(pb.flat(raw_kept()), ref),
    }
    _log_errors(pb, "hvp", errs, log)
    med, samples, inner, paired = bench_interleaved(fns, reps, sample_s, log=lambda s: log(f"  [{pb.name}] hvp {s}"))
    out = {"median_s": med, "samples_s": samples, "inner_calls": inner}
    out.update(_first_calls(pb, first_reps))
    out["engine"] = op.engine
    out["rel_err_vs_float64"] = errs
    out.update(gradient_ratios(med, samples, paired))
    grad_first = statistics.median(out["gradient_during_first_s"])
    out["first_call_in_gradients"] = out["first_call_median_s"] / grad_first
    out["construct_in_gradients"] = out["construct_median_s"] / grad_first
    out["correct"] = all(e <= TOL_HVP for e in errs.values())
    return out


# ----------------------------------------------------------------------------------------
# 2. 32 products at once
# ----------------------------------------------------------------------------------------
def _flat_columns(tensors):
    """Per-parameter (k, *shape) tensors -> one (P, k) matrix."""
    return torch.cat([t.reshape(K_BATCH, -1) for t in tensors], dim=1).T


def run_batch(pb: Problem, reps, sample_s, log):
    """32 HVPs at once (``op @ V``) against a loop, vmap(jvp(grad)) and a batched kept graph."""
    op = pb.nh_operator()
    op @ pb.V  # builds the graph and decides batched-vs-loop (timed inside the operator)
    chosen = {True: "batched (is_grads_batched)", False: "loop", None: "undecided"}[op.batched]
    if op.engine == "structured":  # its run takes the block and goes through it column by column
        chosen = "structured, column by column"
    ref = pb.reference_hvp(pb.V)
    ps, g = pb.raw_kept_graph()
    cols = [pb.V[:, j].contiguous() for j in range(K_BATCH)]
    V_list_batched = [pb.V_dict[n] for n in pb.names]

    def nh_loop():
        return torch.stack([op @ c for c in cols], dim=1)

    def raw_kept_batched():
        return torch.autograd.grad(g, ps, V_list_batched, retain_graph=True, is_grads_batched=True)

    errs = {
        "nethessian op @ V": rel_err(op @ pb.V, ref),
        "nethessian loop of 32": rel_err(nh_loop(), ref),
        "vmap(jvp(grad))": rel_err(_flat_columns(pb.func_hvp_vmap(pb.V_dict).values()), ref),
        "raw kept graph batched (plain torch)": rel_err(_flat_columns(raw_kept_batched()), ref),
    }
    _log_errors(pb, "batch", errs, log)
    fns = {
        "gradient": pb.gradient,
        "nethessian op @ V": lambda: op @ pb.V,
        "nethessian loop of 32": nh_loop,
        "vmap(jvp(grad))": lambda: pb.func_hvp_vmap(pb.V_dict),
        "raw kept graph batched (plain torch)": raw_kept_batched,
    }
    med, samples, inner, paired = bench_interleaved(fns, reps, sample_s, log=lambda s: log(f"  [{pb.name}] batch {s}"))
    out = {"k": K_BATCH, "nethessian_mode": chosen, "median_s": med, "samples_s": samples, "inner_calls": inner}
    out.update(gradient_ratios(med, samples, paired))
    out["rel_err_vs_float64"] = errs
    out["correct"] = all(e <= TOL_HVP for e in errs.values())
    return out
