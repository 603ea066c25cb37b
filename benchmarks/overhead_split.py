#!/usr/bin/env python
"""Where a kept-graph HVP's time goes: nethessian's layers vs the bare autograd call.

Peels nethessian's ``op @ v`` (and ``op @ V``, V of shape (P, 32)) layer by layer,
on the same kept gradient graph, and times each in gradients (interleaved, medians):

    op @ v                       the public call (input checks, chunking, cat)
    op._product                  minus CurvatureOperator.__matmul__ (input checks)
    op._kept_run                 minus the engine's chunking and finiteness check
    flat autograd.grad           one autograd.grad(g, θ_flat, ...) on nethessian's own graph
    flat, contiguous grads       the same with a contiguous (k, P) grad_outputs
    per-parameter autograd.grad  a plain-torch kept graph on per-parameter leaves

and the pieces alone: isfinite(v).all(), the division in objective.finish, the
stack/cat copies. ``--profile`` adds a torch.profiler op table of op @ V vs the bare call.

    .venv/bin/python benchmarks/overhead_split.py [--workloads W2,W3] [--profile]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from _machine import cpu_snapshot, others_load  # noqa: E402
from _timing import THREADS, bench_interleaved  # noqa: E402
from _workloads import Problem  # noqa: E402


def _kept(pb, x):
    """A fresh operator after one product with ``x`` (kept graph built), and that graph."""
    op = pb.nh_operator()
    op @ x
    theta, g, n, _ = op._kept()
    return op, theta, g, n


def split_single(pb, reps, sample_s):
    v = pb.v
    op, theta, g, n = _kept(pb, v)
    ps, gl = pb.raw_kept_graph()
    out = op._kept_run(v[:, None])[:, 0]
    fns = {
        "gradient": pb.gradient,
        "op @ v": lambda: op @ v,
        "op._product(v)": lambda: op._product(v[:, None]),
        "op._kept_run(v)": lambda: op._kept_run(v[:, None]),
        "flat autograd.grad": lambda: torch.autograd.grad(g, theta, v, retain_graph=True),
        "per-parameter autograd.grad": lambda: torch.autograd.grad(gl, ps, pb.v_list, retain_graph=True),
        "isfinite(v).all()": lambda: bool(torch.isfinite(v).all()),
        "finish (out / n)": lambda: op.objective.finish(out, n),
        "stack of 1 column": lambda: torch.stack([out], dim=1)[:, 0],
    }
    return bench_interleaved(fns, reps, sample_s)


def split_batch(pb, reps, sample_s):
    V = pb.V
    op, theta, g, n = _kept(pb, V)
    ps, gl = pb.raw_kept_graph()
    VT = V.T.contiguous()
    Vl = [pb.V_dict[nm] for nm in pb.names]
    out = op._kept_run(V)
    print(f"\n({pb.name}: this operator chose {'is_grads_batched' if op.batched else 'a loop'} for (P, 32))")
    fns = {
        "gradient": pb.gradient,
        "op @ V": lambda: op @ V,
        "op._product(V)": lambda: op._product(V),
        "op._kept_run(V) (batched)": lambda: op._kept_run(V),
        "flat grad, V.T (non-contiguous)": lambda: torch.autograd.grad(
            g, theta, V.T, retain_graph=True, is_grads_batched=True
        ),
        "flat grad, contiguous (k, P)": lambda: torch.autograd.grad(
            g, theta, VT, retain_graph=True, is_grads_batched=True
        ),
        "per-parameter grad, batched": lambda: torch.autograd.grad(
            gl, ps, Vl, retain_graph=True, is_grads_batched=True
        ),
        "isfinite(V).all()": lambda: bool(torch.isfinite(V).all()),
        "finish (out / n)": lambda: op.objective.finish(out, n),
        "cat of 1 chunk": lambda: torch.cat([out], dim=1),
    }
    return bench_interleaved(fns, reps, sample_s)


def profile(pb):
    from torch.profiler import ProfilerActivity, profile as prof

    V = pb.V
    op, theta, g, n = _kept(pb, V)
    VT = V.T.contiguous()
    for name, fn in (
        ("op @ V", lambda: op @ V),
        (
            "flat grad, contiguous (k, P)",
            lambda: torch.autograd.grad(g, theta, VT, retain_graph=True, is_grads_batched=True),
        ),
    ):
        fn()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                fn()
        print(f"\n### {pb.name}: {name} (3 calls)\n")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W2,W3")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}"
    )
    for wl in args.workloads.split(","):
        pb = Problem(wl)
        for title, fn, s in (("one HVP", split_single, 0.05), ("32 HVPs", split_batch, 0.2)):
            a = cpu_snapshot()
            med, _, _, paired = fn(pb, args.reps, s)
            load = others_load(a, cpu_snapshot())
            gm = med["gradient"]
            print(f"\n## {wl}: {title} (gradient {gm * 1e3:.3f} ms; others used {load:.1f} cores)\n")
            print("| layer | ms | gradients (ratio of medians) | gradients (paired) |\n|---|---|---|---|")
            for k, v in med.items():
                print(f"| {k} | {v * 1e3:.3f} | {v / gm:.2f} | {paired[k]:.2f} |")
        if args.profile:
            profile(pb)


if __name__ == "__main__":
    main()
