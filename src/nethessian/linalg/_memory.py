"""Memory each estimator holds beyond the operator's own products, and the ``max_memory`` refusal.

The bounds count, per rank, the vectors an algorithm keeps (``n`` = the local
size: ``P`` unsharded, about ``P / world`` on a sharded operator) in the dtype
they are kept in; they do not count the memory of a product itself (the
model's activations and gradients, see the operator's ``chunk`` rule), nor the
float64 pieces of ``_accumulate`` (``2**18`` rows per column at a time: a few MiB). Every
result carries its bound as ``memory_bytes``; ``max_memory=`` (bytes) refuses a
configuration above it before a single product is spent.

* eigenvalues (thick-restart Lanczos): ``n·ncv·s_basis + n·(max(3b, b + c) + k)·s`` —
  the basis (``ncv`` columns, never more: thick restart), the next block, its product
  and one projection temporary; at the verification the ``k`` Ritz vectors beside
  the basis and the last block, multiplied ``c`` at a time (``verify_chunk``: ``b``
  on a large model, all ``k`` at once on a small one) with the residual formed in
  the product;
  plus ``n·16·s`` when the basis is held in another dtype/device, and ``n·8`` for a
  half-precision operator's float32 residual.
* spectral_density (SLQ): ``n·(m + 4)·s`` with full reorthogonalisation (the
  ``m``-step basis), ``n·4·s`` without (``reorthogonalize=False``: O(P)).
* trace: Hutchinson ``n·2c·s`` (a chunk of ``c`` probes and their products, reduced
  to per-block sums as they come); Hutch++ ``n·(k·w + c·(w + 2s))`` with ``w = max(s, 4)``
  (the sketch A S of ``k = m/3`` columns, orthonormalised in place into Q, in the
  working dtype: float32 for a half-precision operator; then a chunk of basis columns
  or deflated probes with their products); XTrace ``n·(s + 64)·q`` for its ``q``
  probes (ten float64 (n, q) tables).
* diagonal estimate: ``n·(16 + c·(2s + 16))`` (mean, M2, a chunk with its products).
* solve: CG ``n·6·s``, MINRES ``n·10·s``.

Without ``max_memory`` a bound above 80 % of the memory available *now* on the
operator's device (``MemAvailable`` of ``/proc/meminfo`` on the CPU,
``torch.cuda.mem_get_info`` on a GPU; the rest is left to the products' own
temporaries, which the bound does not count) is refused the same way, before any
product: a run that cannot fit would otherwise end in the out-of-memory killer after
minutes of products (seen: GPT-2 124M, top-5 with a 12.4 GB bound beside a 10 GB kept
graph, killed at 24 GB after 69 products). An explicit ``max_memory`` replaces that
check (the caller knows better).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import as_int
from .._columns import column_chunk
from ..errors import InputError

__all__ = [
    "available_bytes",
    "check_memory",
    "density_bytes",
    "diagonal_bytes",
    "lanczos_bytes",
    "size_of",
    "trace_bytes",
    "verify_chunk",
]


def size_of(dtype: torch.dtype) -> int:
    """Bytes per entry of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def lanczos_bytes(
    n: int, ncv: int, b: int, k: int, dtype: torch.dtype, basis_dtype: torch.dtype, separate: bool
) -> int:
    """Per-rank bound of ``eigenvalues`` (module docstring); ``separate``: basis in another dtype/device."""
    s = size_of(dtype)
    extra = (n * 16 * s if separate else 0) + (n * 8 if s < 4 else 0)
    work = max(3 * b, b + verify_chunk(n, k, b)) + k
    return int(n * ncv * size_of(basis_dtype) + n * work * s + extra)


def trace_bytes(method: str, n: int, m: int, c: int, s: int) -> int:
    """Per-rank bound of ``trace``'s estimates: ``m`` products, chunks of ``c``, ``s`` bytes per entry."""
    c = min(c, m)
    if method == "hutchinson":
        return n * c * 2 * s
    if method == "hutch++":
        w = max(s, 4)  # kept in float32 when the operator is in half precision
        return n * ((m // 3) * w + c * (w + 2 * s))
    return n * (s + 64) * (m // 2)


def density_bytes(n: int, steps: int, reorthogonalize: bool, s: int) -> int:
    """Per-rank bound of ``spectral_density`` (SLQ)."""
    return n * ((steps if reorthogonalize else 0) + 4) * s


def diagonal_bytes(n: int, m: int, c: int, s: int) -> int:
    """Per-rank bound of ``diagonal(method="estimate")``."""
    return n * (16 + min(c, m) * (2 * s + 16))


def verify_chunk(n: int, k: int, b: int) -> int:
    """Columns per product when Lanczos verifies its ``k`` pairs: the column rule, at least ``b``."""
    return max(b, column_chunk(n, k))


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB ({int(nbytes):,} bytes)"


HEADROOM = 0.8  # share of the free memory an estimator's vectors may take (the rest: the products' temporaries)


def available_bytes(device: Optional[torch.device]) -> Optional[int]:
    """Memory free now on ``device`` (``None`` when it cannot be told)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(
    what: str, need: int, max_memory: Optional[int], advice: str, device: Optional[torch.device] = None
) -> int:
    """Refuse ``need`` bytes above ``max_memory``, or when it is ``None`` above what ``device`` has free.

    Returns ``need``.
    """
    if max_memory is None:
        free = available_bytes(device)
        if free is not None and need > HEADROOM * free:
            raise InputError(
                f"{what} would hold {gib(need)} per rank beyond the products' own memory, more than "
                f"{HEADROOM:.0%} of the {gib(free)} available now on "
                f"{torch.device('cpu') if device is None else device} (the rest is the products' own); "
                f"{advice}, or pass max_memory= (bytes) to run anyway up to that limit"
            )
        return need
    limit = as_int("max_memory", max_memory, minimum=0)
    if need > limit:
        raise InputError(
            f"{what} would hold {gib(need)} per rank beyond the products' own memory, above "
            f"max_memory = {limit:,} bytes; {advice}, or raise max_memory to {need}"
        )
    return need
