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

from ._accumulate import column_sums
from ._operator import Operator, randn
from ._ortho import (
    basis_matmul,
    block_dot,
    coefficients,
    column_major,
    norms,
    orthonormal_columns,
    project_out,
    subtract_basis,
)

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
    cancellation test passed, so unless a column vanished no further pass is needed (and ``W``
    may be overwritten);
    ``known``: the column norms of ``W``, already computed (spares a pass for ``b = 1``).
    """
    tiny = torch.finfo(op.dtype).eps * max(scale, torch.finfo(torch.float64).tiny)
    if checked and known is not None and W.shape[1] == 1 and float(known[0]) > tiny:
        return W.div_(float(known[0])), known.reshape(1, 1).clone()  # W is the caller's to overwrite
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


# Gram-Schmidt coefficients below this many units of rounding of ‖w‖ are left in w. After the
# known couplings they are the product's own rounding, 1-16 units in float32 on the MLP
# benchmark (up to 40 in float64); a subtraction takes them below 1.5 units. Left in w, they
# keep every new vector ⟂ V to 16 eps, measured at every step: far below semi-orthogonality
# (√eps), where the projected H is already as accurate as rounding allows (Simon 1984).
# On W3 the subtraction then runs at 24 % of the steps instead of 55 % (at 4 units), for the
# same products and eigenvalues.
_ROUNDING = 16.0
_TINY = torch.finfo(torch.float64).tiny


def _below_rounding(c: np.ndarray, norms, dtype: torch.dtype) -> bool:
    """Whether every coefficient is at most ``_ROUNDING`` units of rounding of its column's norm."""
    return bool((np.abs(c).max(axis=0) <= _ROUNDING * torch.finfo(dtype).eps * np.asarray(norms)).all())


def _reorthogonalize(op: Operator, V: torch.Tensor, W: torch.Tensor, j: int):
    """``W`` made ⟂ ``V`` to rounding: ``(W, coefficients taken off, column norms after, asymmetry)``.

    The pass measures ``c = Vᵀ W`` first (one read of the basis). When every ``|c_i|`` is below
    ``_ROUNDING · eps · ‖w‖`` (the products' own rounding, see ``_ROUNDING``) the subtraction,
    a second read of the basis, is skipped and ``c`` is not added to ``H``: ``A V = V H + F S``
    holds as before, and the new vector is ⟂ ``V`` to that many units of rounding, measured at
    every step (a loss of orthogonality cannot grow unseen: once it exceeds that level it is
    taken off). Otherwise ``W − V c``, and
    a second pass when it cancels more than it keeps (DGKS). ``asymmetry``: ``max |c[:j]|``, the
    free symmetry test (``Vᵀ A F − Sᵀ = Vᵀ (A − Aᵀ) F`` up to rounding).
    """
    c = coefficients(op, V, W).numpy()
    asymmetry = float(np.abs(c[:j]).max()) if j else 0.0
    before = norms(op, W)
    if _below_rounding(c, before.numpy(), W.dtype):
        return W, np.zeros_like(c), before, asymmetry
    W = subtract_basis(V, torch.from_numpy(c), W, inplace=True)
    after = norms(op, W)
    # DGKS: again if the pass kept less than 1/√2 of the norm, i.e. (Pythagoras,
    # ‖w before‖² = ‖w after‖² + ‖c‖²) if it took off more than it left
    if not bool((after.numpy() > np.linalg.norm(c, axis=0)).all()):
        W, c2 = project_out(op, V, W, passes=1, inplace=True)
        c = c + c2.numpy()
        after = norms(op, W)
    return W, c, after, asymmetry


def _lean(V: torch.Tensor, F: torch.Tensor) -> bool:
    """Whether ``_Krylov._expand_vector`` applies: the basis kept as the products (float32/64, not MPS)."""
    return (
        V.dtype == F.dtype
        and V.device == F.device
        and F.dtype in (torch.float32, torch.float64)
        and (F.device.type != "mps")
    )


def _measure(op: Operator, V: torch.Tensor, w: torch.Tensor):
    """``(Vᵀ w, ‖w‖)`` as numpy float64 and float, from one transfer (one all-reduce when sharded).

    ``‖w‖²`` is accumulated in float64 (``_accumulate``); ``Vᵀ w`` is one read of the basis.
    """
    c, sq = V.T @ w, column_sums(w, w)
    if not op.sharded and c.device.type == "cpu":
        return c.numpy().astype(np.float64), math.sqrt(float(sq))
    both = op.allreduce_(torch.cat([c.double(), sq.reshape(1)])).cpu().numpy()
    return both[:-1], math.sqrt(both[-1])


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
        nz = torch.nonzero(S.abs().sum(dim=0)).flatten()
        self.lo = int(nz[0]) if nz.numel() else j  # the first column S touches (expand, restart keep it)

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
        ``α = Fᵀ A F`` (``H``'s diagonal block, ``_ortho.block_dot``). What remains
        is nearly ⟂ ``V``: one classical Gram-Schmidt pass against the stored basis
        (two matrix-vector products with ``V[:, :j + b]``) removes the rounding, and the
        DGKS test rarely asks for a second. Done the other way round (the full pass
        first), the pass itself cancels most of ``A F`` and needs the second pass
        nearly every step. The small matrices are handled in numpy (a torch call costs more
        than the arithmetic at this size).
        """
        if self.b == 1 and _lean(self.V, self.F):
            return self._expand_vector(op)
        j, b, lo = self.j, self.b, self.lo  # S touches the columns lo .. j-1
        self.V[:, j : j + b] = self.F.to(self.V.device, self.V.dtype)
        if self.V.dtype != self.F.dtype:  # multiply what the basis holds, so A V = V H + F S stays true
            self.F = self.V[:, j : j + b].to(self.F.device, self.F.dtype)
        W = op @ self.F
        if _shares(W, self.F) or _shares(W, self.V):
            W = W.clone()  # an operator that hands back its input: W is worked on in place below
        C = np.zeros((j + b, b))
        C[lo:j] = self.S.numpy()[:, lo:j].T
        C[j:] = block_dot(op, self.F, W).numpy()  # Fᵀ A F
        W = subtract_basis(self.V[:, lo : j + b], torch.from_numpy(C[lo:]), W, inplace=True)  # known couplings
        W, c, after, self.asymmetry = _reorthogonalize(op, self.V[:, : j + b], W, j)  # the basis as stored
        C += c
        H = np.zeros((j + b, j + b))
        H[:j, :j] = self.H.numpy()
        H[:, j:] = C
        H[j:, :j] = C[:j].T
        H[j:, j:] = (C[j:] + C[j:].T) / 2
        scale = float(np.abs(H).sum(0).max())
        self.F, B = _orthonormalize(op, W, self.V[:, : j + b], self.gen, scale, checked=True, known=after)
        self.S = torch.cat([torch.zeros(b, j, dtype=torch.float64), B], dim=1)
        self.H, self.j, self.lo = torch.from_numpy(H), j + b, j

    def _expand_vector(self, op: Operator) -> None:
        """``expand`` for one vector with the basis stored as the operator's vectors: the same steps in fewer calls.

        A step's own work (0.6-1 ms against a 4-5 ms product on the MLP benchmark) is a chain
        of small operations, each slowed by the product that evicted the caches, so the count
        matters: ``Vᵀ w`` and ``‖w‖²`` (float64-accumulated) come back in one transfer (one
        all-reduce when sharded), ``‖w‖`` after a pass that keeps most of it follows by
        Pythagoras (``‖w‖² − ‖c‖²``; measured again only under cancellation, DGKS), and the next
        vector is written straight into the basis's next column, where the following step
        finds it (no copy).
        """
        j, lo, V = self.j, self.lo, self.V
        f = V[:, j]
        if self.F.data_ptr() != f.data_ptr():
            f.copy_(self.F[:, 0])
        W = op @ V[:, j : j + 1]
        if _shares(W, V):
            W = W.clone()  # an operator that hands back its input: W is worked on in place below
        w = W[:, 0]
        C = np.zeros((j + 1, 1))
        C[lo:j, 0] = self.S.numpy()[0, lo:j]
        a = torch.dot(f, w)
        C[j, 0] = float(op.allreduce_(a.reshape(1))[0]) if op.sharded else float(a)  # fᵀ A f
        w.addmv_(V[:, lo : j + 1], torch.tensor(C[lo:, 0], dtype=w.dtype), alpha=-1)  # known couplings
        c, before = _measure(op, V[:, : j + 1], w)
        self.asymmetry = float(np.abs(c[:j]).max()) if j else 0.0
        after, eps = before, torch.finfo(w.dtype).eps
        if not _below_rounding(c, before, w.dtype):  # else left in w, as in _reorthogonalize
            w.addmv_(V[:, : j + 1], torch.tensor(c, dtype=w.dtype), alpha=-1)
            cc = float(c @ c)
            if cc < before * before / 2:  # kept more than 1/√2: one pass; ‖w‖ by Pythagoras, no read
                after = math.sqrt(before * before - cc)
            else:  # DGKS: measure what the pass left and take it off too
                c2, _ = _measure(op, V[:, : j + 1], w)
                w.addmv_(V[:, : j + 1], torch.tensor(c2, dtype=w.dtype), alpha=-1)
                c, (_, after) = c + c2, _measure(op, V[:, : j + 1], w)
            C[:, 0] += c
        H = np.zeros((j + 1, j + 1))
        H[:j, :j] = self.H.numpy()
        H[:, j] = H[j, :] = C[:, 0]
        scale = float(np.abs(H).sum(0).max())
        if after > eps * max(scale, _TINY):
            self.F = V[:, j + 1 : j + 2] if j + 1 < V.shape[1] else W  # the next column, while there is one
            torch.div(W, after, out=self.F)
        else:  # w vanished: a fresh random direction (_orthonormalize)
            self.F, B = _orthonormalize(op, W, V[:, : j + 1], self.gen, scale, checked=True)
            after = float(B[0, 0])
        S = np.zeros((1, j + 1))
        S[0, j] = after
        self.S, self.H, self.j, self.lo = torch.from_numpy(S), torch.from_numpy(H), j + 1, j

    def restart(self, ritz: "_Ritz", keep: int) -> None:
        """Thick restart: keep the ``keep`` most wanted Ritz vectors (``V ← V Y``, by blocks of rows)."""
        idx = ritz.order[:keep]
        Y = ritz.Y[:, idx]
        Vt, j = self.V.T, self.j  # (ncv, P): the basis stored by columns is this, by rows
        work = torch.float64 if Vt.dtype == torch.float64 else torch.float32
        Yt = Y.T.to(Vt.device, work).contiguous()
        # column blocks: transient j x cols, not P x keep; on the CPU blocks of 8192 keep the
        # product in cache (1.4 ms instead of 1.9 on W3, one thread)
        cols = max(1, min(8192 if Vt.device.type == "cpu" else 1 << 30, (1 << 24) // max(1, j)))
        for a in range(0, Vt.shape[1], cols):
            Vt[:keep, a : a + cols] = (Yt @ Vt[:j, a : a + cols].to(work)).to(Vt.dtype)
        self.H = torch.diag(ritz.theta[idx])
        self.S = self.S @ Y
        self.j, self.filled, self.lo = keep, True, 0


class _Ritz:
    """Ritz values, vectors (in the basis) and residual norms of the current basis."""

    def __init__(self, kry: _Krylov, which: str):
        self.kry, self.which = kry, which
        theta, Y = np.linalg.eigh(kry.H.numpy())  # numpy: a fifth of torch's call overhead at j <= ncv
        self.theta, self.Y = torch.from_numpy(theta), torch.from_numpy(Y)
        self.res = torch.from_numpy(np.linalg.norm(kry.S.numpy() @ Y, axis=0))
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
