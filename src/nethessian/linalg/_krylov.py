"""Lanczos tridiagonalisation with full reorthogonalisation (shared by eigenvalues and SLQ).

Vectors live on the operator's device in its dtype; the Krylov scalars
(alpha, beta) and the reorthogonalisation coefficients are accumulated in
float64 whatever the operator's dtype.

Reference: C. Lanczos (1950); Golub & Van Loan, *Matrix Computations*, §10.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._operator import Operator
from ._ortho import project_out

__all__ = ["Tridiagonal", "lanczos_tridiag"]


@dataclass(frozen=True)
class Tridiagonal:
    """T = Qᵀ A Q with diagonal ``alpha`` (m,) and off-diagonal ``beta`` (m-1,), float64.

    ``Q`` is (P, m) in the operator's dtype (``None`` when not kept); ``beta_next``
    is the norm of the residual after the last step (0 when the Krylov space
    became invariant).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    Q: Optional[torch.Tensor]
    beta_next: float

    def matrix(self) -> torch.Tensor:
        T = torch.diag(self.alpha)
        if self.beta.numel():
            T = T + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)
        return T


def lanczos_tridiag(
    op: Operator, v0: torch.Tensor, steps: int, *, keep_basis: bool = True, reorthogonalize: bool = True
) -> Tridiagonal:
    """Run ``steps`` Lanczos steps from ``v0``, with full reorthogonalisation unless told.

    Stops early when the Krylov space becomes invariant (breakdown). Full
    reorthogonalisation needs the basis (``P x steps``) even when
    ``keep_basis=False``; that flag only controls whether it is returned. With
    ``reorthogonalize=False`` the plain three-term recurrence runs on three
    vectors (O(P) memory; the Gauss quadrature of SLQ stays accurate although
    orthogonality is lost, Knizhnerman 1996) and no basis is kept. Every inner
    product and norm goes through the adapter (summed over the ranks when sharded).
    """
    n = op.size
    steps = int(min(steps, op.global_size))
    full = reorthogonalize or keep_basis
    Q = torch.zeros(n, steps if full else 0, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    q = v0.to(device=op.device, dtype=op.dtype)
    q = q / op.norm(q)
    prev = torch.zeros_like(q)
    m, beta_next = 0, 0.0
    for j in range(steps):
        if full:
            Q[:, j] = q
        w = op @ q
        alpha[j] = op.dot(q, w, dtype=torch.float64).cpu()
        if full:  # two passes of classical Gram-Schmidt against the whole basis ("twice is enough")
            w, _ = project_out(op, Q[:, : j + 1], w)
        else:
            w = w - float(alpha[j]) * q - (float(beta[j - 1]) if j else 0.0) * prev
        b = op.norm(w)
        m, beta_next = j + 1, b
        if j + 1 < steps:
            scale = float(torch.sqrt(alpha[: j + 1].square().sum() + beta[:j].square().sum()))
            if b <= 1e-12 * max(scale, 1e-300) * (1e4 if op.dtype != torch.float64 else 1.0):
                beta_next = 0.0
                break
            beta[j] = b
            prev, q = q, w / b
    return Tridiagonal(alpha[:m].clone(), beta[: m - 1].clone(), Q[:, :m] if keep_basis else None, beta_next)
