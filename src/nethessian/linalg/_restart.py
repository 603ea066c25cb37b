"""Thick-restart block Lanczos machinery: the basis, its projection and the Ritz pairs.

``_Krylov`` keeps ``A V = V H + F S`` (``V`` orthonormal, ``F ⟂ V``); ``_Ritz``
holds the eigenpairs of ``H`` with their residuals ``‖S y‖`` and the error
bound of the stopping rule (see ``_lanczos``'s module docstring for the maths).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ._operator import Operator, randn
from ._ortho import basis_matmul, orthonormal_columns, project_out

__all__: list = []

# Daniel-Gragg-Kaufman-Stewart (1976): a Gram-Schmidt pass that keeps more than
# 1/√2 of a vector's norm leaves it orthogonal to rounding; only a larger
# cancellation calls for a second pass ("twice is enough").
_ETA = 2**-0.5


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
    op: Operator, W: torch.Tensor, V: torch.Tensor, gen: torch.Generator, scale: float, checked: bool = False
):
    """``W = F B`` with ``F`` orthonormal and ⟂ ``V`` (W already ⟂ V), B float64 upper triangular.

    Columns that vanish (rank deficiency: an invariant subspace or a repeated
    direction) get zero rows in ``B`` and a fresh random direction in ``F``.
    "Vanish" means below the rounding of one product, ``eps · scale`` (``scale``
    estimates ‖A‖): zeroing anything larger would drop a true residual and make
    the Krylov residuals claim more than the products support. Inner products
    go through the adapter (``_ortho``), so this is the same on every rank of a
    sharded operator. ``checked``: ``W`` was projected against ``V`` until the
    DGKS test passed, so unless a column vanished no further pass is needed.
    """
    tiny = torch.finfo(op.dtype).eps * max(scale, torch.finfo(torch.float64).tiny)
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
        self.V, self.j, self.H, self.F, self.S, self.gen = V, j, H, F, S, gen
        self.b = F.shape[1]
        # the basis has been full once (a restart happened; a saved state with j > 0 is one)
        self.filled = j > 0
        self.dtype = F.dtype if dtype is None else dtype  # the operator's: rounding of the products

    @classmethod
    def start(
        cls, op: Operator, ncv: int, b: int, gen: torch.Generator, basis_dtype=None, basis_device=None
    ) -> "_Krylov":
        V = torch.zeros(op.size, ncv, dtype=basis_dtype or op.dtype, device=basis_device or op.device)
        X = randn(op, op.size, b, generator=gen)
        F, _ = _orthonormalize(op, X, V[:, :0], gen, op.norm(X))
        return cls(
            V, 0, torch.zeros(0, 0, dtype=torch.float64), F, torch.zeros(b, 0, dtype=torch.float64), gen, op.dtype
        )

    def expand(self, op: Operator) -> None:
        """Append ``F`` to the basis: one block product, one Gram-Schmidt pass (two under cancellation)."""
        j, b = self.j, self.b
        self.V[:, j : j + b] = self.F.to(self.V.device, self.V.dtype)
        if self.V.dtype != self.F.dtype:  # multiply what the basis holds, so A V = V H + F S stays true
            self.F = self.V[:, j : j + b].to(self.F.device, self.F.dtype)
        W = op @ self.F
        C = torch.zeros(j + b, b, dtype=torch.float64)
        exact = W.dtype != torch.float64 and W.device.type != "mps"  # MPS has no float64
        before = op.col_norms(W)
        for sweep in range(2):  # block Gram-Schmidt, a second pass only when needed (DGKS)
            W, c_old = project_out(op, self.V[:, :j], W, passes=1)  # the old basis, as stored
            c = op.dot(self.F, W, dtype=torch.float64 if sweep == 0 and exact else None)
            W = W - self.F @ c.to(W.dtype)  # the new block (in float64 the first time: H's diagonal block)
            C[:j] += c_old
            C[j:] += c.cpu().double()
            after = op.col_norms(W)
            if bool((after > _ETA * before).all()):  # no cancellation: W ⟂ V to rounding already
                break
            before = after
        H = torch.zeros(j + b, j + b, dtype=torch.float64)
        H[:j, :j] = self.H
        H[:, j:] = C
        H[j:, :j] = C[:j].T
        H[j:, j:] = (C[j:] + C[j:].T) / 2
        scale = float(H.abs().sum(0).max())
        self.F, B = _orthonormalize(op, W, self.V[:, : j + b], self.gen, scale, checked=True)
        self.S = torch.cat([torch.zeros(b, j, dtype=torch.float64), B], dim=1)
        self.H, self.j = H, j + b

    def restart(self, ritz: "_Ritz", keep: int) -> None:
        """Thick restart: keep the ``keep`` most wanted Ritz vectors (``V ← V Y``, in row blocks)."""
        idx = ritz.order[:keep]
        Y = ritz.Y[:, idx]
        V, j = self.V, self.j
        work = torch.float64 if V.dtype == torch.float64 else torch.float32
        rows = max(1, (1 << 24) // max(1, j))  # row blocks: transient rows x j, not P x keep
        for a in range(0, V.shape[0], rows):
            blk = V[a : a + rows, :j].to(work) @ Y.to(V.device, work)
            V[a : a + rows, :keep] = blk.to(V.dtype)
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
        res = self.res if res is None else res
        t, j = self.theta, self.theta.numel()
        if j < k:
            return math.inf
        idx = self.order[:k]
        wanted = torch.zeros(j, dtype=torch.bool)
        wanted[idx] = True
        edge = torch.zeros(j, dtype=torch.bool)  # theta is ascending
        edge[1:] |= ~wanted[:-1]
        edge[:-1] |= ~wanted[1:]
        gap = ((t[idx, None] - t[None, :]).abs() - res[None, :]).clamp(min=0.0)
        gap[torch.arange(k), idx] = math.inf
        gap = gap.min(dim=1).values
        gap[edge[idx] | torch.isinf(gap)] = 0.0  # a lone Ritz value knows no gap
        r = res[idx]
        err = torch.where(gap > 0, torch.minimum(r, r * r / gap.clamp(min=1e-300)), r)
        floor = math.sqrt(torch.finfo(self.kry.dtype).eps) * float(t.abs().max())
        target = tol * torch.clamp(t[idx].abs(), min=max(floor, torch.finfo(torch.float64).tiny))
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
