"""Extreme eigenvalues of a symmetric operator: thick-restart (block) Lanczos.

Lanczos builds an orthonormal basis ``V`` (P x j) of a Krylov space and the
projected matrix ``H = Vᵀ A V`` (float64, j x j). With full
reorthogonalisation the Krylov relation

    A V = V H + F S,        F (P x b) orthonormal, F ⟂ V,  S (b x j)

holds to rounding, so a Ritz pair ``(θ, x = V y)`` of ``H y = θ y`` has the
residual ``‖A x − θ x‖ = ‖S y‖`` without another product. When ``V`` is full
(``ncv`` columns) it is compressed to the wanted Ritz vectors and a few of
their neighbours, ``V ← V Y``, ``H ← diag(θ)``, ``S ← S Y``; the relation still
holds and the Krylov space grows again from ``F`` (thick restart). Blocks of
``b`` vectors go through the operator in one ``A @ F`` call.

Stopping rule. A Ritz value ``θ`` with residual ``r`` is within ``r`` of an
eigenvalue, and within ``r²/δ`` when the rest of the spectrum is at least ``δ``
away (Parlett, ch. 11). ``δ`` is estimated as the distance to the nearest other
Ritz interval ``θ_j ± r_j``; next to an unwanted Ritz value the spectrum is not
resolved yet (eigenvalues may hide there), so there ``δ = 0``. Every wanted pair
must reach ``min(r, r²/δ) ≤ tol · max(|θ|, √eps · max|θ|)``: inside a cluster the
quadratic bound stops early, the pair at the edge of the wanted set needs
``r ≤ tol·|θ|``. Like any Krylov method from a random start, an eigenvalue whose
eigenvector is nearly orthogonal to the start, or a further copy of a repeated
eigenvalue (beyond ``block_size``), can be missed; the pairs returned are still
true eigenpairs with honest residuals. A block of ``b`` vectors or a smaller
``tol`` makes a miss rarer.

References:
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric
    eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 602-616 (2000).
    G. W. Stewart, "A Krylov-Schur algorithm for large eigenproblems",
    SIAM J. Matrix Anal. Appl. 23(3), 601-614 (2001).
    B. N. Parlett, *The Symmetric Eigenvalue Problem*, SIAM (1998), ch. 11
    (the r²/gap bound); G. H. Golub and R. Underwood (1977) for block Lanczos.
"""
from __future__ import annotations

import math
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

import torch
from tqdm import tqdm

from ..errors import CheckpointError, InputError
from .._params import ParamLayout
from ._operator import Operator, as_operator, check_symmetric, make_generator, randn

__all__ = ["EigenResult", "eigenvalues"]

Which = Literal["largest", "smallest", "both", "magnitude"]
_WHICH = ("largest", "smallest", "both", "magnitude")


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: (k,) float64. Descending for ``"largest"``, descending in
            ``|λ|`` for ``"magnitude"``, ascending for ``"smallest"`` and ``"both"``.
        eigenvectors: (P, k) unit columns in the operator's dtype and device.
        residuals: (k,) float64, ``‖A v − λ v‖`` of each returned pair (from the
            Krylov relation; equal to a recomputed residual up to rounding, about
            ``eps·‖A‖`` in the operator's dtype).
        num_matvecs: every product with the operator, the symmetry check included.
        converged: whether every pair met ``tol``.
        layout: the operator's ``ParamLayout``, or ``None`` for a plain matrix.
        which: the end of the spectrum that was asked for.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    layout: Optional[ParamLayout] = None
    which: str = "largest"

    def eigenvectors_by_name(self) -> List[Dict[str, torch.Tensor]]:
        """One ``{parameter name: tensor in its natural shape}`` dict per eigenvector."""
        if self.layout is None:
            raise InputError("these eigenvectors have no parameter names: the operator was a plain "
                             "matrix without a `layout`; use `.eigenvectors[:, i]` instead")
        return [self.layout.unflatten(self.eigenvectors[:, i]) for i in range(self.eigenvectors.shape[1])]

    def to_dict(self, *, eigenvectors: bool = False) -> Dict[str, Any]:
        """JSON-ready dict (plain floats); eigenvectors only when asked (they are P x k)."""
        out: Dict[str, Any] = {
            "which": self.which,
            "eigenvalues": [float(x) for x in self.eigenvalues],
            "residuals": [float(x) for x in self.residuals],
            "num_matvecs": int(self.num_matvecs),
            "converged": bool(self.converged),
        }
        if self.layout is not None:
            out["parameters"] = list(self.layout.names)
        if eigenvectors:
            out["eigenvectors"] = self.eigenvectors.cpu().double().T.tolist()
        return out

    def __repr__(self) -> str:
        vals = ", ".join(f"{float(x):.6g}" for x in self.eigenvalues)
        return (f"EigenResult(which={self.which!r}, eigenvalues=[{vals}], "
                f"num_matvecs={self.num_matvecs}, converged={self.converged})")


def eigenvalues(op: Any, k: int = 5, *, which: Which = "largest", tol: float = 1e-3,
                seed: Optional[int] = 0, max_matvecs: Optional[int] = None, block_size: int = 1,
                ncv: Optional[int] = None, check_symmetry: bool = True, checkpoint: Any = None,
                progress: bool = False) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Stops when every wanted Ritz value ``θ`` has the error bound
    ``min(r, r²/δ) ≤ tol · max(|θ|, √eps · max|θ|)`` (residual ``r``, gap ``δ``;
    see the module docstring); the floor lets eigenvalues near 0 stop. When
    ``P < ncv + block_size`` the matrix is formed with ``P`` products and solved
    densely (exact; ``max_matvecs`` and ``checkpoint`` are then unused).

    Args:
        op: a square operator with ``@`` on (P,) and (P, m) tensors, or a symmetric tensor.
        k: number of eigenpairs, ``1 <= k < P``.
        which: ``"largest"`` / ``"smallest"`` (algebraic; ``"smallest"`` finds negative
            curvature), ``"magnitude"`` (largest ``|λ|``), or ``"both"``: the
            ``k // 2`` smallest and the ``k - k // 2`` largest (odd k: one more at the top).
        tol: relative accuracy of the eigenvalues.
        seed: seed of the CPU generator for the starting block (same on every device).
        max_matvecs: budget of products, the symmetry check included (default ``20 * ncv``).
            When it runs out the result has ``converged=False`` and a warning is issued.
        block_size: vectors per product; ``b > 1`` suits operators that do many
            vectors in one pass and finds eigenvalues of multiplicity up to ``b``.
            Single-vector Lanczos (``b = 1``) sees one copy of a repeated eigenvalue.
        ncv: basis size (default ``max(2k + 1, 20, k + 6b)``), memory ``P x ncv``.
        check_symmetry: spend 2 products checking ``uᵀ(Av) = vᵀ(Au)`` (not when resuming).
        checkpoint: a ``nethessian._checkpoint.Checkpoint``; resumed from at the start,
            written after every restart and at the end.
        progress: show a tqdm bar (products done) on stderr.

    Returns:
        EigenResult.

    Raises:
        InputError: bad ``k``, ``which``, ``tol``, ``ncv``, ``block_size`` or a non-square operator.
        NotSymmetricError: the symmetry check failed.
        NonFiniteError: a product returned NaN or Inf.
        CheckpointError: the checkpoint was made for another problem or other settings.

    >>> A = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    >>> res = eigenvalues(A, k=3, tol=1e-10)
    >>> [round(x, 8) for x in res.eigenvalues.tolist()], res.converged
    ([40.0, 39.0, 38.0], True)
    """
    op = as_operator(op)
    P, b = op.size, int(block_size)
    _validate(P, k, which, tol, b)
    k = int(k)
    ncv = _basis_size(P, k, b, ncv)
    max_matvecs = _budget(max_matvecs, ncv, k, b, check_symmetry)
    gen = make_generator(seed)
    if P < ncv + b:
        if check_symmetry:
            check_symmetric(op, gen)
        return _dense(op, k, which)
    meta = {"P": P, "k": k, "which": which, "block_size": b, "ncv": ncv,
            "dtype": str(op.dtype), "seed": seed}
    kry = _resume(checkpoint, meta, op, gen)
    if kry is None:
        if check_symmetry:
            check_symmetric(op, gen)
        kry = _Krylov.start(op, ncv, b, gen)
    ritz, bound = _iterate(kry, op, k, which, tol, ncv, max_matvecs, checkpoint, meta, progress)
    _save(checkpoint, kry, meta, op, force=True)
    if bound > 1.0:
        warnings.warn(
            f"eigenvalues(which={which!r}, k={k}) did not reach tol={tol:g} in {op.num_matvecs} "
            f"products (max_matvecs={max_matvecs}); the worst error bound is {bound:.3g}x the "
            "target. Raise max_matvecs or ncv, or loosen tol; the residuals returned are honest.",
            UserWarning, stacklevel=2)
    return ritz.result(k, op, bound <= 1.0)


def _iterate(kry: "_Krylov", op: Operator, k: int, which: str, tol: float, ncv: int,
             max_matvecs: int, checkpoint: Any, meta: Dict[str, Any], progress: bool):
    """Expand, test, restart until every wanted pair meets ``tol`` or the budget is spent."""
    b = kry.b
    keep = min(k + max(b, (ncv - k) // 2), ncv - b)  # wanted + buffer kept at a restart
    with tqdm(total=max_matvecs, initial=min(op.num_matvecs, max_matvecs), disable=not progress,
              file=sys.stderr, desc="eigenvalues", unit="Av") as bar:
        while True:
            ritz = _Ritz(kry, which)
            bound = ritz.worst_bound(k, tol)
            bar.set_postfix_str(f"basis={kry.j} bound/tol={bound:.2g}", refresh=False)
            if bound <= 1.0 or op.num_matvecs + b > max_matvecs:
                return ritz, bound
            if kry.j + b > ncv:
                kry.restart(ritz, keep)
                _save(checkpoint, kry, meta, op)
            kry.expand(op)
            bar.update(min(b, max_matvecs - bar.n))


def _validate(P: int, k: int, which: str, tol: float, b: int) -> None:
    if which not in _WHICH:
        raise InputError(f"unknown which={which!r}; choose one of {', '.join(map(repr, _WHICH))}")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1 or k >= P:
        raise InputError(
            f"k={k!r} must be an integer with 1 <= k < P = {P} (the operator's size); for so small "
            "a problem form the dense matrix and use torch.linalg.eigvalsh(A_dense)")
    if not (tol > 0 and math.isfinite(tol)):
        raise InputError(f"tol={tol!r} must be a positive relative accuracy such as 1e-3")
    if b < 1:
        raise InputError(f"block_size={b} must be at least 1")


def _basis_size(P: int, k: int, b: int, ncv: Optional[int]) -> int:
    if ncv is None:
        return max(2 * k + 1, 20, k + 6 * b)
    if ncv < k + b:
        raise InputError(f"ncv={ncv} is too small: it must be at least k + block_size = {k + b}")
    return int(ncv)


def _budget(max_matvecs: Optional[int], ncv: int, k: int, b: int, check_symmetry: bool) -> int:
    if max_matvecs is None:
        return 20 * ncv
    least = -(-k // b) * b + (2 if check_symmetry else 0)
    if max_matvecs < least:
        raise InputError(f"max_matvecs={max_matvecs} cannot even build {k} Ritz pairs; allow at least {least}")
    return int(max_matvecs)


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
    """
    F, B = torch.linalg.qr(W)
    B = B.cpu().double()
    tiny = 50 * torch.finfo(op.dtype).eps * max(scale, torch.finfo(torch.float64).tiny)
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

    def worst_bound(self, k: int, tol: float) -> float:
        """Worst ratio of error bound to target over the ``k`` wanted pairs (inf when j < k).

        The gap of a wanted pair is its distance to the nearest other Ritz interval
        ``θ_j ± r_j``; next to an unwanted Ritz value the spectrum is not resolved
        yet (eigenvalues may hide there), so that gap counts as 0 and the bound is ``r``.
        """
        t, j = self.theta, self.theta.numel()
        if j < k:
            return math.inf
        idx = self.order[:k]
        wanted = torch.zeros(j, dtype=torch.bool)
        wanted[idx] = True
        edge = torch.zeros(j, dtype=torch.bool)  # theta is ascending
        edge[1:] |= ~wanted[:-1]
        edge[:-1] |= ~wanted[1:]
        gap = ((t[idx, None] - t[None, :]).abs() - self.res[None, :]).clamp(min=0.0)
        gap[torch.arange(k), idx] = math.inf
        gap = gap.min(dim=1).values
        gap[edge[idx] | torch.isinf(gap)] = 0.0  # a lone Ritz value knows no gap
        r = self.res[idx]
        err = torch.where(gap > 0, torch.minimum(r, r * r / gap.clamp(min=1e-300)), r)
        floor = math.sqrt(torch.finfo(self.kry.V.dtype).eps) * float(t.abs().max())
        target = tol * torch.clamp(t[idx].abs(), min=max(floor, torch.finfo(torch.float64).tiny))
        return float((err / target).max())

    def result(self, k: int, op: Operator, converged: bool) -> EigenResult:
        idx = self.order[:k]
        idx = idx[_final_order(self.theta[idx], self.which)]
        X = self.kry.V[:, :self.kry.j] @ _like(self.Y[:, idx], self.kry.V)
        return EigenResult(self.theta[idx].clone(), X, self.res[idx].clone(), op.num_matvecs,
                           converged, op.layout, self.which)


def _dense(op: Operator, k: int, which: str) -> EigenResult:
    """Small P: form the matrix with P products and solve it exactly."""
    A = (op @ torch.eye(op.size, dtype=op.dtype, device=op.device)).cpu().double()
    A = (A + A.T) / 2
    theta, Y = torch.linalg.eigh(A)
    idx = _rank(theta, which)[:k]
    idx = idx[_final_order(theta[idx], which)]
    vals, vecs = theta[idx], Y[:, idx]
    res = (A @ vecs - vecs * vals).norm(dim=0)
    return EigenResult(vals, _like(vecs, op), res, op.num_matvecs, True, op.layout, which)


def _like(x: torch.Tensor, ref: Any) -> torch.Tensor:
    """``x`` in ``ref``'s dtype, then on its device (cast on the host: MPS has no float64)."""
    return x.to(ref.dtype).to(ref.device)


def _resume(checkpoint: Any, meta: Dict[str, Any], op: Operator, gen: torch.Generator):
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return None
    if state.get("meta") != meta:
        raise CheckpointError(
            f"the Lanczos checkpoint was made for {state.get('meta')}, not {meta}; "
            "rerun with the original arguments or delete the checkpoint file")
    gen.set_state(state["generator"])
    op.num_matvecs = int(state["num_matvecs"])
    return _Krylov(_like(state["V"], op), int(state["j"]), state["H"], _like(state["F"], op), state["S"], gen)


def _save(checkpoint: Any, kry: _Krylov, meta: Dict[str, Any], op: Operator, force: bool = False) -> None:
    if checkpoint is not None:
        state = {"V": kry.V, "j": kry.j, "H": kry.H, "F": kry.F, "S": kry.S,
                 "generator": kry.gen.get_state(), "num_matvecs": op.num_matvecs}
        checkpoint.save({"meta": meta, **state}, force=force)
