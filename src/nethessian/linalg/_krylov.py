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


def lanczos_tridiag(op: Operator, v0: torch.Tensor, steps: int, *, keep_basis: bool = True) -> Tridiagonal:
    """Run ``steps`` Lanczos steps from ``v0`` with full reorthogonalisation.

    Stops early when the Krylov space becomes invariant (breakdown).
    Full reorthogonalisation needs the basis even when ``keep_basis=False``;
    that flag only controls whether it is returned.
    """
    n = op.size
    steps = int(min(steps, n))
    Q = torch.zeros(n, steps, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    q = v0.to(device=op.device, dtype=op.dtype)
    q = q / q.double().norm().to(q.dtype)
    m = 0
    beta_next = 0.0
    for j in range(steps):
        Q[:, j] = q
        w = op @ q
        a = torch.dot(q.double(), w.double())
        alpha[j] = a
        # two passes of classical Gram-Schmidt against the whole basis ("twice is enough")
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        b = float(w.double().norm())
        m = j + 1
        beta_next = b
        if j + 1 < steps:
            scale = float(torch.sqrt(alpha[: j + 1].square().sum() + beta[:j].square().sum()))
            if b <= 1e-12 * max(scale, 1e-300) * (1e4 if op.dtype != torch.float64 else 1.0):
                beta_next = 0.0
                break
            beta[j] = b
            q = w / b
    return Tridiagonal(alpha[:m].clone(), beta[: m - 1].clone(), Q[:, :m] if keep_basis else None, beta_next)
