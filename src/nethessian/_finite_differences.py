"""Finite-difference Hessians with a step per direction and an error estimate for every entry.

The derivative of the gradient g along a displacement δ is estimated by central differences
at three step lengths, D_k = (g(θ + kδ) − g(θ − kδ)) / 2k for k = 1, 2, 4, each with error

    D_k − Hδ = k² c + O(k⁴) + rounding,   rounding ≈ u·|g| / k   (u the unit roundoff),

then combined by Richardson extrapolation, R_1 = (4D_1 − D_2)/3, R_2 = (4D_2 − D_4)/3, which
cancels the k² term. The error of R_1 is estimated from the data themselves,

    err ≈ |R_1 − R_2| + 4u·max_k |g(θ ± kδ)|,

where |R_1 − R_2| holds both the remaining truncation (≈ 15× that of R_1) and the rounding noise
of the differences, and the second term is a floor for entries whose noise cancels by chance.
The step is chosen per direction: it starts at u^(1/3)·max(1, |θ_j|) and is divided by 8 while
truncation dominates, or multiplied by 8 while rounding dominates, as long as the estimate
improves. So a feature multiplied by 1e3 or a bias at 1000 gets its own step, and neither
spoils the other directions. The displacement that θ ± kδ really made after rounding is
measured exactly ((θ + kδ) − θ, Sterbenz), so the direction differentiated is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ._checks import all_finite
from ._progress import Progress
from .errors import NetHessianError

__all__ = ["Derivative", "directional_derivative", "fd_hessian", "fd_hessian_with_errors", "fd_steps"]

U = torch.finfo(torch.float64).eps
_GROW = 8.0
_MAX_TRIES = 5
_TARGET = 1e-8  # relative error estimate at which the step search stops

Gradient = Callable[[torch.Tensor], torch.Tensor]


def fd_steps(theta: torch.Tensor) -> torch.Tensor:
    """First step tried per coordinate: u^(1/3)·max(1, |θ_j|) (balances O(h²) truncation and u/h rounding)."""
    return U ** (1 / 3) * theta.double().abs().clamp_min(1.0)


def _ladder(grad: Gradient, theta: torch.Tensor, delta: torch.Tensor):
    """Richardson estimate of H·a from steps δ, 2δ, 4δ, with its error estimates.

    ``a`` (≈ δ) is the displacement that θ ± kδ really made after rounding; the
    truncation and rounding error estimates come with it.
    """
    D, A, gmax = [], [], torch.zeros_like(theta)
    for k in (1, 2, 4):
        xp, xm = theta + k * delta, theta - k * delta
        gp, gm = grad(xp), grad(xm)
        D.append((gp - gm) / (2 * k))
        A.append(((xp - theta) - (xm - theta)) / (2 * k))  # exact differences (Sterbenz)
        gmax = torch.maximum(gmax, torch.maximum(gp.abs(), gm.abs()))
    r1, r2 = (4 * D[0] - D[1]) / 3, (4 * D[1] - D[2]) / 3
    return r1, (4 * A[0] - A[1]) / 3, (r1 - r2).abs(), 4 * U * gmax


@dataclass(frozen=True)
class Derivative:
    """H·d estimated by finite differences along ``direction`` with step ``step``.

    Attributes:
        value: the estimate of H·direction.
        error: an estimate of ``|value − H·direction|``, entry by entry.
        direction: the direction actually differentiated: ``d`` up to the rounding of θ ± kh·d.
        step: h, the step length along ``direction``.
        gradients: gradient evaluations spent.
    """

    value: torch.Tensor
    error: torch.Tensor
    direction: torch.Tensor
    step: float
    gradients: int


def directional_derivative(
    grad: Gradient, theta: torch.Tensor, d: torch.Tensor, h: float, target: float = _TARGET
) -> Derivative:
    """Estimate H·d with the step search described in the module docstring.

    Args:
        grad: θ ↦ ∇J(θ) in float64.
        theta: the point.
        d: the direction (any scale).
        h: the first step length tried along ``d``.
        target: stop once the error estimate is below ``target`` × max |H·d|.
    """
    best, last_dir, evals = None, 0, 0
    for _ in range(_MAX_TRIES):
        r1, a, trunc, rnd = _ladder(grad, theta, h * d)
        evals += 6
        if not bool(a.ne(0).any()):  # below the spacing of the numbers at θ: a larger step
            h, last_dir = h * _GROW, 1
            continue
        cand = Derivative(r1 / h, (trunc + rnd) / h, a / h, h, evals)
        if not (all_finite(cand.value) and all_finite(cand.error)):  # left the domain: a smaller step
            h, last_dir = h / _GROW, -1
            continue
        if best is not None and float(cand.error.max()) >= float(best.error.max()):
            break
        best = cand
        if float(best.error.max()) <= target * float(best.value.abs().max()):
            break
        direction = -1 if float(trunc.max()) > float(rnd.max()) else 1
        if direction == -last_dir:
            break
        h, last_dir = h * _GROW**direction, direction
    if best is None:
        raise NetHessianError(
            "finite differences found no step giving a finite gradient that moves θ "
            f"(last step tried {h:.1e}): the gradient is not finite near θ, so nh.check "
            "cannot compare this model with finite differences"
        )
    return Derivative(best.value, best.error, best.direction, best.step, evals)


def fd_hessian_with_errors(
    grad: Gradient, theta: torch.Tensor, eps: Optional[float] = None, *, progress: Optional[bool] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finite-difference Hessian column by column, symmetrised; entrywise error estimates; steps.

    Column j is the derivative of g along e_j (``directional_derivative``) starting from the
    step ``eps`` or u^(1/3)·max(1, |θ_j|). Returns ``(F, E, steps)``: F = (R + Rᵀ)/2,
    E = (E_R + E_Rᵀ)/2 bounds |F − H| entrywise to within the estimates, and steps[j] the step
    used for column j.
    """
    theta = theta.double()
    P = theta.numel()
    first = fd_steps(theta) if eps is None else torch.full_like(theta, float(eps))
    R = torch.empty(P, P, dtype=torch.float64, device=theta.device)
    E = torch.empty_like(R)
    steps = torch.empty(P, dtype=torch.float64)
    with Progress(P, "finite-difference Hessian", unit="column", enabled=progress) as bar:
        for j in range(P):
            e = torch.zeros_like(theta)
            e[j] = 1.0
            col = directional_derivative(grad, theta, e, float(first[j]))
            c = col.direction[j]  # 1 up to the rounding of θ_j ± kh
            R[:, j], E[:, j], steps[j] = col.value / c, col.error / c, col.step
            bar.update(1)
    return 0.5 * (R + R.T), 0.5 * (E + E.T), steps


def fd_hessian(objective, eps: Optional[float] = None) -> torch.Tensor:
    """Central-difference Hessian of ``objective`` (float64), column by column, symmetrised.

    Each column gets its own step (see the module docstring); ``eps`` sets the first step tried
    for every column instead of u^(1/3)·max(1, |θ_j|).
    """

    def grad(t):
        return objective.gradient(t).double()

    return fd_hessian_with_errors(grad, objective.theta0, eps)[0]
