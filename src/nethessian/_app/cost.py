"""What a run will cost, said before it starts: planned products × the time of one product measured now.

One rule for the report and the command line: :func:`estimate_line` measures one product
of the operator (one extra product) and multiplies it by the planned (fewest, most)
products. :func:`command_products` plans the products of the CLI commands.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, Tuple

import torch

from .. import distributed as dist

__all__ = [
    "ANNOUNCE_ABOVE_S",
    "announce",
    "command_memory",
    "command_products",
    "estimate_line",
    "memory_words",
    "product_kind",
    "product_time",
]

#: a CLI command whose planned work (at most) exceeds this many seconds prints its estimate on stderr
ANNOUNCE_ABOVE_S = 30.0


def product_time(op) -> float:
    """Seconds of one product ``op @ v`` with a seeded random v (measured once, now)."""
    P = op.shape[0]
    v = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v.to(device=op.device, dtype=op.dtype)
    if op.device is not None and torch.device(op.device).type == "cuda":
        torch.cuda.synchronize(op.device)
    t0 = time.perf_counter()
    op @ v
    if op.device is not None and torch.device(op.device).type == "cuda":
        torch.cuda.synchronize(op.device)
    return time.perf_counter() - t0


def estimate_line(
    P: int, mode: Optional[str], products: Tuple[int, int], t: float, what: str = "Hessian-vector"
) -> str:
    """``P = …, mode; lo–hi <what> products × t ms each ≈ a–b s`` (one number when lo = hi)."""
    lo, hi = products
    span = f"{lo}" if lo == hi else f"{lo}–{hi} (Lanczos stops when converged)"
    when = f"{lo * t:.1f} s" if lo == hi else f"{lo * t:.1f}–{hi * t:.1f} s"
    return f"P = {P:,}{', ' + mode if mode else ''}; {span} {what} products × {t * 1e3:.3g} ms each ≈ {when}"


def _ncv(args, k: int, P: int) -> int:
    """The basis size ``eigenvalues`` will use (its own default rule when ``--ncv`` is not given)."""
    from ..linalg._lanczos_options import _basis_size

    return min(_basis_size(P, k, 1, getattr(args, "ncv", None)), P)


def _lanczos_span(args, k: int, P: int) -> Tuple[int, int]:
    ncv = _ncv(args, k, P)
    return (P, P) if P < ncv + 1 else (ncv, 20 * ncv)


def command_products(args, P: int) -> Optional[Tuple[int, int]]:
    """(fewest, most) products of a CLI command (``None``: not a long command)."""
    cmd = args.command
    if cmd == "hessian":
        return P, P
    if cmd == "eig":
        k = args.k if args.which != "both" else args.k - args.k // 2
        lo, hi = _lanczos_span(args, min(k, P - 1), P)
        return (2 * lo, 2 * hi) if args.which == "both" else (lo, hi)
    if cmd in ("trace", "diag"):
        exact = args.exact if cmd == "trace" else args.method == "exact"
        if exact:
            return P, P
        m = args.num_matvecs if args.num_matvecs is not None else _default_matvecs(args)
        return m, m
    if cmd == "density":
        n = args.probes * min(args.steps, P) + 2
        return n, n
    return None


def _default_matvecs(args) -> int:
    """The library's default budget: ``trace``'s own rule; ``diagonal(method="estimate")`` uses 100."""
    from ..linalg._trace import _budget

    return _budget(args.method, None) if args.command == "trace" else 100


def command_memory(args, n: int, P: int, dtype: torch.dtype) -> Optional[int]:
    """The per-rank memory bound the estimator of a CLI command will state (``linalg._memory``), or None.

    ``n``: this rank's share of the P entries. ``None`` for the exact (column-by-column or
    dense) commands, whose memory check is their own.
    """
    from ..linalg import _memory as mem
    from ..linalg._util import chunk_for

    s, cmd = mem.size_of(dtype), args.command
    if cmd == "eig":
        k = min(args.k, P - 1)
        ncv = _ncv(args, k, P)
        return None if P < ncv + 1 else mem.lanczos_bytes(n, ncv, 1, k, dtype, dtype, False)
    if cmd == "trace" and not args.exact:
        m = args.num_matvecs if args.num_matvecs is not None else _default_matvecs(args)
        return mem.trace_bytes(args.method, n, m, chunk_for(n, m, None), s)
    if cmd == "diag" and args.method == "estimate":
        m = args.num_matvecs if args.num_matvecs is not None else _default_matvecs(args)
        return mem.diagonal_bytes(n, m, chunk_for(n, m, args.chunk_size), s)
    if cmd == "density":
        return mem.density_bytes(n, min(args.steps, P), True, s)
    return None


def memory_words(nbytes: int) -> str:
    """``"3.2 GiB"``-style size."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def product_kind(options: Optional[Dict[str, Any]]) -> Optional[str]:
    """``"finite-difference, order 4: 4 gradients per product"`` for the operator's options; None when exact."""
    if not options or options.get("method") != "finite-difference":
        return None
    from .fsdp import gradients_per_product

    order = options.get("fd_order", 2)
    grads = gradients_per_product(order, options.get("fd_error", True))
    return f"finite-difference, order {order}: {grads} gradients per product"


def announce(args, op, options: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """On rank 0, print the estimate on stderr when the run may take more than ``ANNOUNCE_ABOVE_S``.

    Returns the line (``None`` when nothing was printed). The measurement costs one product,
    taken on every rank (under torch.distributed a product is a collective). ``options``:
    the operator's keywords (finite-difference products are said so, with their gradients).
    P is the whole vector's size (``global_size``: the sum of the ranks' shards when sharded).
    """
    P = getattr(op, "global_size", op.shape[0])
    products = command_products(args, P)
    if products is None:
        return None
    t = product_time(op)
    if not dist.is_main() or products[1] * t < ANNOUNCE_ABOVE_S:
        return None
    line = f"nethessian {args.command}: {estimate_line(P, product_kind(options), products, t)}"
    held = command_memory(args, op.shape[0], P, op.dtype)
    if held is not None:
        line += f"; holds ≤ {memory_words(held)} of vectors per rank beside the model (--max-memory caps it)"
    print(line, file=sys.stderr, flush=True)
    return line
