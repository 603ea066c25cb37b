"""Float64 accumulation over long vectors without a float64 copy of them.

``x.sum(dtype=torch.float64)``, ``torch.linalg.vector_norm(x, dtype=torch.float64)``
and ``x.double()`` all materialise a float64 copy of ``x`` on the CPU (measured: a
200 MB float32 vector takes 384 MB more at the peak), which at 124 M parameters is a
gigabyte per vector that no stated memory bound counts. These helpers convert
``PIECE`` rows at a time instead: the transient memory is ``PIECE`` rows of float64,
the result the same float64 sums (the pieces' partial sums are added in float64).

>>> import torch
>>> x = torch.arange(5.0)
>>> float(column_sums(x, x)), gram(x.reshape(-1, 1), torch.ones(5, 2)).tolist()
(30.0, [[10.0, 10.0]])
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["PIECE", "column_sums", "gram"]

PIECE = 1 << 18  # rows converted to float64 at a time (2 MiB per column)


def _piece(X: torch.Tensor, a: int) -> torch.Tensor:
    p = X[a : a + PIECE]
    return p.cpu().double() if p.device.type == "mps" else p.double()  # MPS has no float64


def column_sums(X: torch.Tensor, Y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_rows X ⊙ Y`` (``Σ_rows X`` when ``Y`` is None) per column, float64; ``X``, ``Y`` (n,) or (n, k)."""
    n = X.shape[0]
    total = None
    for a in range(0, max(n, 1), PIECE):
        x = _piece(X, a)
        if Y is X and (x.dim() == 1 or x.shape[1] == 1):  # one column: no squared temporary (Lanczos, every step)
            flat = x.reshape(-1)
            part = torch.dot(flat, flat).reshape(x.shape[1:])
        else:
            part = (x if Y is None else x * x if Y is X else x * _piece(Y, a)).sum(dim=0)
        total = part if total is None else total + part
    return total


def gram(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Xᵀ Y`` (a x b, float64) of two (n, a), (n, b) blocks, accumulated a piece of rows at a time."""
    total = None
    for a in range(0, max(X.shape[0], 1), PIECE):
        part = _piece(X, a).T @ _piece(Y, a)
        total = part if total is None else total + part
    return total
