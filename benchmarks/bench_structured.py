"""Smoke benchmark of the structured engine (second-order backpropagation).

Ratios to one gradient, same process, 2 threads:

* exact diagonal of ``nh.examples.mlp()`` (784-128-64-10, N=1024): structured engine
  (weighted outer-product factors, ``_factors``) vs column-by-column autodiff (P products;
  timed on 64 columns and extrapolated);
* exact diagonal of ``nh.examples.cnn()`` (N=256), the same two;
* dense Hessian of an MLP 64-48-32-10 (N=512): structured vs autodiff (``nh.hessian``).

Smoke sizes by default (``--full`` for the issue's sizes); the machine is shared, so
the numbers are indicative. Run: ``python benchmarks/bench_structured.py [--full]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import nethessian as nh
from nethessian.structured import StructuredEngine


def _best(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _interleaved(fns, repeat: int = 7):
    """Minimum time of each function, measured in turns (a shared machine's load hits all alike)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def diagonal(label: str, model, loss, data) -> None:
    op = nh.HessianOperator(model, loss, data)
    engine = StructuredEngine(op.objective)
    grad, diag = _interleaved([op.objective.gradient, engine.diagonal])
    V = torch.eye(op.shape[0], 64, dtype=op.dtype)
    column = _best(lambda: op @ V) / 64
    print(
        f"diagonal {label}: gradient {grad * 1e3:.1f} ms; structured {diag * 1e3:.0f} ms "
        f"= {diag / grad:.1f} gradients; autodiff P={op.shape[0]} columns ~ {column * op.shape[0]:.0f} s "
        f"= {column * op.shape[0] / grad:.0f} gradients"
    )


def dense_mlp(n: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.Tanh(), torch.nn.Linear(48, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    )
    data = (torch.randn(n, 64), torch.randint(0, 10, (n,)))
    loss = torch.nn.CrossEntropyLoss()
    op = nh.HessianOperator(model, loss, data)
    grad = _best(op.objective.gradient)
    s = _best(lambda: nh.hessian(model, loss, data, engine="structured"), repeat=1)
    a = _best(lambda: nh.hessian(model, loss, data, engine="autodiff"), repeat=1)
    print(
        f"dense MLP 64-48-32-10 N={n} (P={op.shape[0]}): structured {s:.2f} s = {s / grad:.0f} gradients; "
        f"autodiff {a:.2f} s = {a / grad:.0f} gradients"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's sizes (N=1024 and N=512)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    diagonal(f"MLP 784-128-64-10 N={1024 if args.full else 128}", *nh.examples.mlp(n=1024 if args.full else 128))
    diagonal(f"CNN N={256 if args.full else 32}", *nh.examples.cnn(n=256 if args.full else 32))
    dense_mlp(512 if args.full else 64)
