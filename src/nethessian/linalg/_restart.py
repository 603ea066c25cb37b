"""Thick-restart block Lanczos machinery: the basis, its projection and the Ritz pairs.

``_Krylov`` keeps ``A V = V H + F S`` (``V`` orthonormal, ``F ⟂ V``); ``_Ritz``
holds the eigenpairs of ``H`` with their residuals ``‖S y‖`` and the error
bound of the stopping rule (see ``_lanczos``'s module docstring for the maths).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from ._operator import Operator, randn
from ._ortho import basis_matmul, column_major, exact_dot, norms, orthonormal_columns, project_out, subtract_basis

__all__: list = []


# Daniel-Gragg-Kaufman-Stewart (1976): a Gram-Schmidt pass that keeps more than
# 1/√2 of a vector's norm leaves it orthogonal to rounding; only a larger
# cancellation calls for a second pass ("twice is enough"). The bound is sharp for
# a Krylov basis: a pass keeping a fraction 1/κ leaves the basis's own loss of
# orthogonality ω multiplied by about √(κ² − 1) in the new vector, so any laxer
# test lets ω grow geometrically from step to step (``_Krylov.expand``).


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _rank(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of the Ritz values, most wanted first (``"both"`` alternates top, bottom)."""
    if which == "largest":
        return torch.argsort(theta, descending=True, stable=True)
    if which == "smallest":
        return torch.argsort(theta, stable=True)
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True, stable=True)
    up, down = torch.argsort(theta, descending=True, stable=True), torch.argsort(theta, stable=True)
    order = torch.stack([up, down], dim=1).reshape(-1).tolist()
    return torch.tensor(list(dict.fromkeys(order)), dtype=torch.long)


def _final_order(values: torch.Tensor, which: str) -> torch.Tensor:
    """Order of the returned pairs: descending (in ``|λ|`` for magnitude), ascending for smallest/both."""
    return _rank(values, which if which in ("largest", "magnitude") else "smallest")


def _orthonormalize(
    op: Operator,
    W: torch.Tensor,
    V: torch.Tensor,
    gen: torch.Generator,
    scale: float,
    checked: bool = False,
    known: Optional[torch.Tensor] = None,
):
    """``W = F B`` with ``F`` orthonormal and ⟂ ``V`` (W already ⟂ V), B float64 upper triangular.

    Columns that vanish (rank deficiency: an invariant subspace or a repeated
    direction) get zero rows in ``B`` and a fresh random direction in ``F``.
    "Vanish" means below the rounding of one product, ``eps · scale`` (``scale``
    estimates ‖A‖): zeroing anything larger would drop a true residual and make
    the Krylov residuals claim more than the products support. Inner products
    go through the adapter (``_ortho``), so this is the same on every rank of a
    sharded operator. ``checked``: ``W`` was projected against ``V`` until the
    cancellation test passed, so unless a column vanished no further pass is needed;
    ``known``: the column norms of ``W``, already computed (spares a pass for ``b = 1``).
    """
    tiny = torch.finfo(op.dtype).eps * max(scale, torch.finfo(torch.float64).tiny)
    if checked and known is not None and W.shape[1] == 1 and float(known[0]) > tiny:
        return W / float(known[0]), known.reshape(1, 1).clone()
    F, B = orthonormal_columns(op, W, tiny)
    bad = B.diagonal() == 0
    if checked and not bool(bad.any()):
        return F, B
    if bool(bad.any()):
        F[:, bad.to(F.device)] = randn(op, op.size, int(bad.sum()), generator=gen).to(F.dtype)
    for _ in range(2):  # "twice is enough", also for the fresh random columns
        F, _c = project_out(op, V, F, passes=1)
        F, R = orthonormal_columns(op, F)
        B = R @ B
    return F, B


class _Krylov:
    """Basis ``V[:, :j]``, projected ``H`` (j x j) and next block ``F`` with ``A V = V H + F S``.

    ``V`` (P x ncv) may be held in another dtype or on another device than the
    operator (``basis_dtype``/``basis_device``): ``F`` and the products stay in
    the operator's dtype and device, the basis is read ``_ortho._COLS`` columns at a time.
    """

    def __init__(self, V, j, H, F, S, gen, dtype=None):
        self.V, self.j, self.H, self.F, self.S, self.gen = column_major(V), j, H, F, S, gen
        self.b = F.shape[1]
        # the basis has been full once (a restart happened; a saved state with j > 0 is one)
        self.filled = j > 0
        self.dtype = F.dtype if dtype is None else dtype  # the operator's: rounding of the products
        self.asymmetry = 0.0  # max |Vᵀ(A − Aᵀ)F| seen by the last expansion (see ``expand``)

    @classmethod
    def start(
        cls, op: Operator, ncv: int, b: int, gen: torch.Generator, basis_dtype=None, basis_device=None
    ) -> "_Krylov":
        V = torch.zeros(ncv, op.size, dtype=basis_dtype or op.dtype, device=basis_device or op.device).T
        X = randn(op, op.size, b, generator=gen)
        F, _ = _orthonormalize(op, X, V[:, :0], gen, op.norm(X))
        return cls(
            V, 0, torch.zeros(0, 0, dtype=torch.float64), F, torch.zeros(b, 0, dtype=torch.float64), gen, op.dtype
        )

    def expand(self, op: Operator) -> None:
        """Append ``F`` to the basis: one block product, the known couplings, one Gram-Schmidt pass.

        By the Krylov relation the coefficients of ``A F`` on ``V`` are ``Sᵀ`` (the
        three-term recurrence; after a restart the whole kept block), so ``A F − V Sᵀ − F α``
        is formed first, in one pass over the few columns ``S`` touches and ``F``, with
        ``α = Fᵀ A F`` accumulated in float64 (``H``'s diagonal block). What remains
        is nearly ⟂ ``V``: one classical Gram-Schmidt pass against the stored basis
        (two matrix-vector products with ``V[:, :j + b]``) removes the rounding, and the
        DGKS test rarely asks for a second. Done the other way round (the full pass
        first), the pass itself cancels most of ``A F`` and needs the second pass
        nearly every step.
        """
        j, b = self.j, self.b
        self.V[:, j : j + b] = self.F.to(self.V.device, self.V.dtype)
        if self.V.dtype != self.F.dtype:  # multiply what the basis holds, so A V = V H + F S stays true
            self.F = self.V[:, j : j + b].to(self.F.device, self.F.dtype)
        W = op @ self.F
        if _shares(W, self.F) or _shares(W, self.V):
            W = W.clone()  # an operator that hands back its input: W is worked on in place below
        C = torch.zeros(j + b, b, dtype=torch.float64)
        nz = torch.nonzero(self.S.abs().sum(dim=0)).flatten()
        lo = int(nz[0]) if nz.numel() else j  # the columns S touches: lo .. j-1
        C[lo:j] = self.S[:, lo:j].T
        spent = self.F if b == 1 else None  # F's last use: its memory takes the products x_i y_i
        C[j:] = exact_dot(op, self.F, W, spent).cpu().double()  # Fᵀ A F, float64-accumulated
        W = subtract_basis(self.V[:, lo : j + b], C[lo:], W, inplace=True)  # known couplings, diagonal block
        for sweep in range(2):  # classical Gram-Schmidt, a second pass only under cancellation (DGKS)
            W, c_all = project_out(op, self.V[:, : j + b], W, passes=1, inplace=True)  # the basis as stored
            C += c_all
            if sweep == 0:  # Vᵀ A F − S ᵀ = Vᵀ (A − Aᵀ) F up to rounding: a free symmetry test
                self.asymmetry = float(c_all[:j].abs().max()) if j else 0.0
            after = norms(op, W)
            # DGKS: again if the pass kept less than 1/√2 of the norm, i.e. (Pythagoras,
            # ‖w before‖² = ‖w after‖² + ‖c‖²) if it took off more than it left
            if bool((after > c_all.norm(dim=0)).all()):
                break
        H = torch.zeros(j + b, j + b, dtype=torch.float64)
        H[:j, :j] = self.H
        H[:, j:] = C
        H[j:, :j] = C[:j].T
        H[j:, j:] = (C[j:] + C[j:].T) / 2
        scale = float(H.abs().sum(0).max())
        self.F, B = _orthonormalize(op, W, self.V[:, : j + b], self.gen, scale, checked=True, known=after)
        self.S = torch.cat([torch.zeros(b, j, dtype=torch.float64), B], dim=1)
        self.H, self.j = H, j + b

    def restart(self, ritz: "_Ritz", keep: int) -> None:
        """Thick restart: keep the ``keep`` most wanted Ritz vectors (``V ← V Y``, by blocks of rows)."""
        idx = ritz.order[:keep]
        Y = ritz.Y[:, idx]
        Vt, j = self.V.T, self.j  # (ncv, P): the basis stored by columns is this, by rows
        work = torch.float64 if Vt.dtype == torch.float64 else torch.float32
        Yt = Y.T.to(Vt.device, work).contiguous()
        cols = max(1, (1 << 24) // max(1, j))  # column blocks: transient j x cols, not P x keep
        for a in range(0, Vt.shape[1], cols):
            Vt[:keep, a : a + cols] = (Yt @ Vt[:j, a : a + cols].to(work)).to(Vt.dtype)
        self.H = torch.diag(ritz.theta[idx])
        self.S = self.S @ Y
        self.j, self.filled = keep, True


class _Ritz:
    """Ritz values, vectors (in the basis) and residual norms of the current basis."""

    def __init__(self, kry: _Krylov, which: str):
        self.kry, self.which = kry, which
        self.theta, self.Y = torch.linalg.eigh(kry.H)
        self.res = (kry.S @ self.Y).norm(dim=0)
        self.order = _rank(self.theta, which)

    def worst_bound(self, k: int, tol: float, res: Optional[torch.Tensor] = None) -> float:
        """Worst ratio of error bound to target over the ``k`` wanted pairs (inf when j < k).

        The gap of a wanted pair is its distance to the nearest other Ritz interval
        ``θ_j ± r_j``; next to an unwanted Ritz value the spectrum is not resolved
        yet (eigenvalues may hide there), so that gap counts as 0 and the bound is ``r``.
        ``res`` replaces the Krylov residuals (e.g. by recomputed true ones).
        """
        res = (self.res if res is None else res).numpy()  # numpy: ~10x less overhead at this size
        t, j = self.theta.numpy(), self.theta.numel()
        if j < k:
            return math.inf
        idx = self.order[:k].numpy()
        wanted = np.zeros(j, dtype=bool)
        wanted[idx] = True
        edge = np.zeros(j, dtype=bool)  # theta is ascending
        edge[1:] |= ~wanted[:-1]
        edge[:-1] |= ~wanted[1:]
        gap = np.clip(np.abs(t[idx, None] - t[None, :]) - res[None, :], 0.0, None)
        gap[np.arange(k), idx] = math.inf
        gap = gap.min(axis=1)
        gap[edge[idx] | np.isinf(gap)] = 0.0  # a lone Ritz value knows no gap
        r = res[idx]
        err = np.where(gap > 0, np.minimum(r, r * r / np.maximum(gap, 1e-300)), r)
        floor = math.sqrt(torch.finfo(self.kry.dtype).eps) * float(np.abs(t).max())
        target = tol * np.maximum(np.abs(t[idx]), max(floor, torch.finfo(torch.float64).tiny))
        return float((err / target).max())

    def wanted(self, k: int):
        """The ``k`` wanted pairs in the order returned: indices into ``theta`` and unit vectors ``X``."""
        idx = self.order[:k]
        idx = idx[_final_order(self.theta[idx], self.which)]
        X = basis_matmul(self.kry.V[:, : self.kry.j], self.Y[:, idx], self.kry.F)
        return idx, X


def _like(x: torch.Tensor, ref: Any) -> torch.Tensor:
    """``x`` in ``ref``'s dtype, then on its device (cast on the host: MPS has no float64)."""
    return x.to(ref.dtype).to(ref.device)
