"""Memory each estimator holds beyond the operator's own products, and the ``max_memory`` refusal.

The bounds count, per rank, the vectors an algorithm keeps (``n`` = the local
size: ``P`` unsharded, about ``P / world`` on a sharded operator) in the dtype
they are kept in; they do not count the memory of a product itself (the
model's activations and gradients, see the operator's ``chunk`` rule). Every
result carries its bound as ``memory_bytes``; ``max_memory=`` (bytes) refuses a
configuration above it before a single product is spent.

* eigenvalues (thick-restart Lanczos): ``n·ncv·s_basis + n·(3b + 2k)·s`` — the
  basis (``ncv`` columns, never more: thick restart), the next block, its product
  and one projection temporary, and the ``k`` Ritz vectors with their products at
  the verification; plus ``n·16·s`` when the basis is held in another dtype/device.
* spectral_density (SLQ): ``n·(m + 4)·s`` with full reorthogonalisation (the
  ``m``-step basis), ``n·4·s`` without (``reorthogonalize=False``: O(P)).
* trace: Hutchinson ``n·c·(2s + 8)`` (a chunk of ``c`` probes, their products and
  the float64 row table); Hutch++ ``n·(k·(s + 24) + 24·g + 2c·s)`` (sketch,
  its float64 product, Q and A Q; the g deflated probes, their deflation and
  products); XTrace ``n·(s + 64)·q`` for its ``q`` probes (ten float64 (n, q) tables).
* diagonal estimate: ``n·(16 + c·(2s + 16))`` (mean, M2, a chunk with its products).
* solve: CG ``n·6·s``, MINRES ``n·10·s``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import as_int
from ..errors import InputError

__all__ = ["check_memory", "lanczos_bytes", "size_of"]


def size_of(dtype: torch.dtype) -> int:
    """Bytes per entry of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def lanczos_bytes(
    n: int, ncv: int, b: int, k: int, dtype: torch.dtype, basis_dtype: torch.dtype, separate: bool
) -> int:
    """Per-rank bound of ``eigenvalues`` (module docstring); ``separate``: basis in another dtype/device."""
    s = size_of(dtype)
    return int(n * ncv * size_of(basis_dtype) + n * (3 * b + 2 * k) * s + (n * 16 * s if separate else 0))


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB ({int(nbytes):,} bytes)"


def check_memory(what: str, need: int, max_memory: Optional[int], advice: str) -> int:
    """Refuse ``need`` bytes above ``max_memory`` (``None``: no limit); returns ``need``."""
    if max_memory is None:
        return need
    limit = as_int("max_memory", max_memory, minimum=0)
    if need > limit:
        raise InputError(
            f"{what} would hold {gib(need)} per rank beyond the products' own memory, above "
            f"max_memory = {limit:,} bytes; {advice}, or raise max_memory to {need}"
        )
    return need
