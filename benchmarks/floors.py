#!/usr/bin/env python
"""What this machine allows on W3: the product's arithmetic floor and the Lanczos step's memory floor.

Where ``profile_lanczos.py`` splits a run into products and the solver's own work, this
measures the floors those parts sit on, from plain torch calls on tensors shaped like W3's
(no nethessian solver involved):

* **the product**: its matrix products' floating-point operations (the structured engine's
  second-order forward and backward passes) divided by the rate of a large matrix product
  (this machine's attainable peak), against the measured product;
* **the basis read** every Lanczos step makes (``Vᵀ w``, one pass over a P x ncv float32
  basis): with the basis in cache, right after a product, and after 2 ms idle; with 1 and 2
  torch threads (MKL runs this shape on one thread);
* **the thick restart** ``V ← V Y`` (keep x ncv times ncv x P).

    .venv/bin/python benchmarks/floors.py          # ~30 s
    .venv/bin/python benchmarks/floors.py --out benchmarks/results/floors_w3.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import nethessian as nh  # noqa: E402
from _timing import median_time  # noqa: E402
from _workloads import make_workload  # noqa: E402


def timed(fn, reps=60, before=None):
    """Median seconds of ``fn()`` after one warm-up call (``_timing.median_time``)."""
    fn()
    return median_time(fn, reps, before)


def product_flops(model: nn.Sequential, n: int) -> float:
    """Multiply-adds x 2 of one structured Hessian-vector product (``structured/_hvp.py``).

    Per Linear (d_in -> d_out): forward tangent ``a Vᵀ`` (+ ``R Wᵀ`` below the first layer),
    weight rows ``Rgᵀ a`` (+ ``gᵀ R_in``), and below the first layer the input gradient
    ``Rg W + g V``: 2 products at the first layer, 6 at every other.
    """
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return sum((2 if i == 0 else 6) * 2.0 * n * m.in_features * m.out_features for i, m in enumerate(linears))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ncv", type=int, default=20, help="basis columns (nh.eigenvalues' default for k=5)")
    ap.add_argument("--keep", type=int, default=12, help="Ritz vectors kept at a restart (the default for k=5)")
    ap.add_argument("--out", default="", help="JSON output")
    args = ap.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    warnings.simplefilter("ignore")
    model, loss_fn, X, y = make_workload("W3")
    op = nh.HessianOperator(model, loss_fn, (X, y))
    P, ncv, keep = op.shape[0], args.ncv, args.keep
    v = torch.randn(P, 1)
    res = {"engine": op.engine, "threads": torch.get_num_threads(), "P": P, "ncv": ncv, "keep": keep}

    A, B = torch.randn(1024, 4096), torch.randn(4096, 4096)
    res["peak_gflops"] = 2 * 1024 * 4096 * 4096 / timed(lambda: A @ B, reps=10) / 1e9
    res["product_mflop"] = product_flops(model, X.shape[0]) / 1e6
    res["product_floor_ms"] = res["product_mflop"] / res["peak_gflops"]
    res["product_ms"] = timed(lambda: op @ v) * 1e3

    V = torch.randn(ncv, P).T  # stored by columns, as Lanczos keeps it
    w = torch.randn(P)
    mb = P * ncv * 4 / 1e6
    read = {
        "in cache": timed(lambda: V.T @ w),
        "after a product": timed(lambda: V.T @ w, before=lambda: op @ v),
        "after 2 ms idle": timed(lambda: V.T @ w, before=lambda: time.sleep(0.002)),
    }
    torch.set_num_threads(1)
    read["in cache, 1 thread"] = timed(lambda: V.T @ w)
    torch.set_num_threads(res["threads"])
    res["basis_mb"] = mb
    res["basis_read_us"] = {k: t * 1e6 for k, t in read.items()}
    res["basis_read_gbs"] = {k: mb / 1e3 / t for k, t in read.items()}
    Yt = torch.randn(keep, ncv)
    res["restart_ms"] = timed(lambda: Yt @ V.T, reps=30, before=lambda: op @ v) * 1e3
    res["restart_mflop"] = 2.0 * keep * ncv * P / 1e6
    report(res)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"argv": sys.argv[1:], "time": time.strftime("%Y-%m-%d %H:%M"), **res}, fh, indent=1)
        print(f"wrote {args.out}")


def report(r):
    read = r["basis_read_us"]
    print(f"W3 (P = {r['P']:,}), {r['threads']} threads, engine {r['engine']}")
    print("| quantity | measured | floor | ratio |\n|---|---|---|---|")
    print(
        f"| one product | {r['product_ms']:.2f} ms | {r['product_floor_ms']:.2f} ms "
        f"({r['product_mflop']:.0f} MFLOP at {r['peak_gflops']:.0f} GFLOP/s) | "
        f"{r['product_ms'] / r['product_floor_ms']:.2f} |"
    )
    for k, us in read.items():
        print(
            f"| basis read Vᵀw ({r['basis_mb']:.1f} MB), {k} | {us:.0f} µs | {r['basis_read_gbs'][k]:.1f} GB/s | "
            f"{us / 1e3 / r['product_ms']:.1%} of a product |"
        )
    print(
        f"| thick restart V Y ({r['keep']} x {r['ncv']}), after a product | {r['restart_ms']:.2f} ms | "
        f"{r['restart_mflop']:.0f} MFLOP: {r['restart_mflop'] / r['peak_gflops']:.2f} ms at peak | "
        f"{r['restart_ms'] / (r['restart_mflop'] / r['peak_gflops']):.1f} |"
    )


if __name__ == "__main__":
    main()
