"""Orthogonalisation through the adapter's inner products (sharded-safe), with a bounded basis.

Every inner product goes through ``Operator.dot`` so that on a sharded operator
(each rank holding a slice of the vectors) the coefficients are summed over the
ranks and identical everywhere. The basis ``V`` may live in another dtype or on
another device than the working vectors (``basis_dtype`` / ``basis_device`` of
``nh.eigenvalues``): it is then brought over ``_COLS`` columns at a time, so the
transient memory stays ``P x _COLS`` in the working dtype.

* ``project_out``: classical Gram-Schmidt against ``V``, ``W ← W − V (Vᵀ W)``,
  one all-reduce per pass.
* ``norms`` / ``block_dot``: column norms accumulated in float64 without float64 copies of
  the long vectors (``_accumulate``), and the new block's own coefficients.
* ``column_major``: the basis stored by columns, so a leading block of it is one
  contiguous stretch of memory (a Gram-Schmidt pass reads ``n·j``, not ``n·ncv``, entries).
* ``orthonormal_columns``: column-by-column classical Gram-Schmidt with two passes
  ("twice is enough", Giraud, Langou, Rozložník 2005) — a Gram-based QR that
  needs only all-reduced inner products, as stable as Householder QR once
  the second pass is done. A column whose norm after projection is at most
  ``tiny`` is set to 0 (its row of ``R`` is 0): the caller decides what to put there.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._operator import Operator

__all__ = [
    "basis_matmul",
    "block_dot",
    "coefficients",
    "column_major",
    "norms",
    "orthonormal_columns",
    "project_out",
    "subtract_basis",
]

_COLS = 16  # basis columns brought to the working dtype/device at a time


def _same_home(V: torch.Tensor, W: torch.Tensor) -> bool:
    return V.dtype == W.dtype and V.device == W.device


def _vt_w(op: Operator, V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Vᵀ W`` summed over the ranks, in ``W``'s dtype and on its device."""
    if _same_home(V, W):
        return op.dot(V, W)
    parts = [op.dot(V[:, a : a + _COLS].to(W.device, W.dtype), W, reduce=False) for a in range(0, V.shape[1], _COLS)]
    return op.allreduce_(torch.cat(parts, dim=0).contiguous())


def column_major(V: torch.Tensor) -> torch.Tensor:
    """``V`` (n x m) with each column contiguous (strides ``(1, n)``), copied only when it is not.

    A Krylov basis is read a leading block of columns at a time (``V[:, :j]``): stored by
    columns, that block is one contiguous stretch of memory, so ``V[:, :j]ᵀ W`` and
    ``V[:, :j] c`` read ``n·j`` entries instead of the whole ``n·m`` array.
    """
    if V.dim() == 2 and V.stride() == (1, max(1, V.shape[0])):
        return V
    return V.T.contiguous().T


def norms(op: Operator, X: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the (global) columns of ``X`` (n, k) or of a vector, float64 (k,) on the CPU.

    Accumulated in float64 without a float64 copy of ``X`` (``Operator.col_norms``).
    """
    return op.col_norms(X.reshape(-1, 1) if X.dim() == 1 else X)


def block_dot(op: Operator, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Xᵀ Y`` (b x m, float64 on the CPU) for a few columns: in the working dtype for float32/float64.

    One column each is ``torch.dot`` (on the CPU MKL's ``(1 x n) @ (n x 1)`` matmul is ~10x slower).
    For the Krylov block's own coefficients ``Fᵀ A F``: the Gram-Schmidt pass that follows
    measures what this leaves along ``F`` and adds it, so their sum is as accurate as any
    other coefficient of the pass (a float64-accumulated sum would be rounded by that pass
    anyway). Half precision, or MPS, is accumulated in float64 (``Operator.dot``, no float64 copy).
    """
    if X.dtype != Y.dtype or X.dtype not in (torch.float32, torch.float64) or X.device.type == "mps":
        return op.dot(X, Y, dtype=torch.float64).cpu()
    if X.shape[1] == 1 and Y.shape[1] == 1:
        out = torch.dot(X[:, 0], Y[:, 0]).reshape(1, 1)
    else:
        out = X.T @ Y
    return op.allreduce_(out.contiguous()).cpu().double()


def _times(V: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``V @ Y``; for ``V`` stored by columns as ``(Yᵀ Vᵀ)ᵀ``, the result stored by columns too.

    MKL's ``(P x j)(j x k)`` product with ``V`` by columns runs up to 4x slower on the CPU
    (W3: j = 20, k = 5, 4.1 ms against 1.1 ms the other way round).
    """
    if V.dim() == 2 and Y.dim() == 2 and V.stride(0) == 1:
        return (Y.T @ V.T).T
    return V @ Y


def basis_matmul(V: torch.Tensor, Y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``V @ Y`` in ``like``'s dtype and on its device (local rows; no reduction)."""
    Y = Y.to(like.device, like.dtype)
    if _same_home(V, like):
        return _times(V, Y)
    out = torch.zeros(V.shape[0], *Y.shape[1:], dtype=like.dtype, device=like.device)
    for a in range(0, V.shape[1], _COLS):
        out += _times(V[:, a : a + _COLS].to(like.device, like.dtype), Y[a : a + _COLS])
    return out


def subtract_basis(V: torch.Tensor, c: torch.Tensor, W: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``W − V c`` in one fused pass when ``V`` lives with ``W``; ``inplace``: into ``W`` itself.

    In place spares a fresh (n, b) tensor per call: on a CPU each one is a new memory
    mapping whose pages fault on first touch, which costs more than the arithmetic.
    """
    c = c.to(W.device, W.dtype)
    if _same_home(V, W) and W.dim() == 2:
        return W.addmm_(V, c, alpha=-1) if inplace else torch.addmm(W, V, c, alpha=-1)
    return W.sub_(basis_matmul(V, c, W)) if inplace else W - basis_matmul(V, c, W)


def coefficients(op: Operator, V: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Vᵀ W`` summed over the ranks, float64 on the CPU (one read of ``V``)."""
    if V.shape[1] == 0:
        return torch.zeros(0, *W.shape[1:], dtype=torch.float64)
    return _vt_w(op, V, W).cpu().double()


def project_out(
    op: Operator, V: torch.Tensor, W: torch.Tensor, passes: int = 2, inplace: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``W − V (VᵀW)`` repeated ``passes`` times (``inplace``: into ``W``); it and the summed coefficients.

    The coefficients are float64 on the CPU.
    """
    C = torch.zeros(V.shape[1], *W.shape[1:], dtype=torch.float64)
    if V.shape[1] == 0:
        return W, C
    for _ in range(passes):
        c = _vt_w(op, V, W)
        W = subtract_basis(V, c, W, inplace)
        C += c.cpu().double()
    return W, C


def orthonormal_columns(
    op: Operator, W: torch.Tensor, tiny: float = 0.0, rtol: float = 0.0, inplace: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``W = Q R`` by column-wise two-pass Gram-Schmidt; ``R`` float64 (k x k) upper triangular on the CPU.

    ``R`` has a non-negative diagonal; a column whose norm after projection is
    ``<= tiny`` or ``<= rtol ·`` its norm before (it lay in the span of the
    previous ones, e.g. more columns than dimensions) gets ``Q[:, i] = 0`` and
    ``R[i, i] = 0`` (``QQᵀ`` stays a projector). ``inplace``: ``Q`` is written over
    ``W`` (column ``i`` of ``W`` is read only before it is replaced), so a large
    sketch is orthonormalised without a second copy of it.
    """
    k = W.shape[1]
    Q = W if inplace else torch.zeros_like(W)
    R = torch.zeros(k, k, dtype=torch.float64)
    before = norms(op, W) if rtol > 0 else torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        w, c = project_out(op, Q[:, :i], W[:, i])
        R[:i, i] = c
        r = float(norms(op, w)[0])
        if r > tiny and r > rtol * float(before[i]) and r > 0:
            Q[:, i] = w / r
            R[i, i] = r
        else:
            Q[:, i] = 0
    return Q, R
