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

__all__: list = []


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


def _orthonormalize(op: Operator, W: torch.Tensor, V: torch.Tensor, gen: torch.Generator,
                    scale: float):
    """``W = F B`` with ``F`` orthonormal and ⟂ ``V`` (W already ⟂ V), B float64 upper triangular.

    Columns that vanish (rank deficiency: an invariant subspace or a repeated
    direction) get zero rows in ``B`` and a fresh random direction in ``F``.
    "Vanish" means below the rounding of one product, ``eps · scale`` (``scale``
    estimates ‖A‖): zeroing anything larger would drop a true residual and make
    the Krylov residuals claim more than the products support.
    """
    F, B = torch.linalg.qr(W)
    B = B.cpu().double()
    tiny = torch.finfo(op.dtype).eps * max(scale, torch.finfo(torch.float64).tiny)
    bad = B.diagonal().abs() <= tiny
    if bool(bad.any()):
        B[bad] = 0.0
        F = F.clone()
        F[:, bad.to(F.device)] = randn(op, op.size, int(bad.sum()), generator=gen)
    for _ in range(2):  # "twice is enough", also for the fresh random columns
        F = F - V @ (V.T @ F)
        F, R = torch.linalg.qr(F)
        B = R.cpu().double() @ B
    return F, B


class _Krylov:
    """Basis ``V[:, :j]``, projected ``H`` (j x j) and next block ``F`` with ``A V = V H + F S``."""

    def __init__(self, V, j, H, F, S, gen):
        self.V, self.j, self.H, self.F, self.S, self.gen = V, j, H, F, S, gen
        self.b = F.shape[1]

    @classmethod
    def start(cls, op: Operator, ncv: int, b: int, gen: torch.Generator) -> "_Krylov":
        V = torch.zeros(op.size, ncv, dtype=op.dtype, device=op.device)
        X = randn(op, op.size, b, generator=gen)
        F, _ = _orthonormalize(op, X, V[:, :0], gen, float(X.norm()))
        return cls(V, 0, torch.zeros(0, 0, dtype=torch.float64), F, torch.zeros(b, 0, dtype=torch.float64), gen)

    def expand(self, op: Operator) -> None:
        """Append ``F`` to the basis: one block product, two Gram-Schmidt passes."""
        j, b = self.j, self.b
        self.V[:, j:j + b] = self.F
        V = self.V[:, :j + b]
        W = op @ self.F
        C = torch.zeros(j + b, b, dtype=torch.float64)
        for sweep in range(2):
            c = V.T @ W
            c64 = c.cpu().double()
            if sweep == 0 and W.dtype != torch.float64 and W.device.type != "mps":
                c64[j:] = (self.F.double().T @ W.double()).cpu()  # the new diagonal block in float64
                c = _like(c64, W)
            W = W - V @ c
            C += c64
        H = torch.zeros(j + b, j + b, dtype=torch.float64)
        H[:j, :j] = self.H
        H[:, j:] = C
        H[j:, :j] = C[:j].T
        H[j:, j:] = (C[j:] + C[j:].T) / 2
        scale = float(H.abs().sum(0).max())
        self.F, B = _orthonormalize(op, W, V, self.gen, scale)
        self.S = torch.cat([torch.zeros(b, j, dtype=torch.float64), B], dim=1)
        self.H, self.j = H, j + b

    def restart(self, ritz: "_Ritz", keep: int) -> None:
        """Thick restart: keep the ``keep`` most wanted Ritz vectors."""
        idx = ritz.order[:keep]
        Y = ritz.Y[:, idx]
        self.V[:, :keep] = self.V[:, :self.j] @ _like(Y, self.V)
        self.H = torch.diag(ritz.theta[idx])
        self.S = self.S @ Y
        self.j = keep


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
        floor = math.sqrt(torch.finfo(self.kry.V.dtype).eps) * float(t.abs().max())
        target = tol * torch.clamp(t[idx].abs(), min=max(floor, torch.finfo(torch.float64).tiny))
        return float((err / target).max())

    def wanted(self, k: int):
        """The ``k`` wanted pairs in the order returned: indices into ``theta`` and unit vectors ``X``."""
        idx = self.order[:k]
        idx = idx[_final_order(self.theta[idx], self.which)]
        X = self.kry.V[:, :self.kry.j] @ _like(self.Y[:, idx], self.kry.V)
        return idx, X


def _like(x: torch.Tensor, ref: Any) -> torch.Tensor:
    """``x`` in ``ref``'s dtype, then on its device (cast on the host: MPS has no float64)."""
    return x.to(ref.dtype).to(ref.device)


