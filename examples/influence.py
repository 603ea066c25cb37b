"""Influence of one training point on a test loss, checked against leave-one-out retraining.

Koh & Liang (2017), "Understanding black-box predictions via influence functions", ICML.

The problem is L2-regularised logistic regression, strictly convex, written as an
``nn.Module`` whose output carries the penalty, so the Hessian nethessian computes
includes it. The convention, with ``ℓ_n(θ) = BCE(x_n, y_n; θ) + ½λ‖w‖²``:

    θ̂        = argmin R(θ),   R(θ) = (1/N) Σ_n ℓ_n(θ),    H = ∇²R(θ̂)
    θ̂_{−i}   = argmin (1/N) Σ_{n≠i} ℓ_n(θ)               (leave point i out)
    θ̂_{−i} − θ̂ ≈ (1/N) H⁻¹ ∇ℓ_i(θ̂)                      (one Newton step from θ̂)
    Δ_i = L_test(θ̂_{−i}) − L_test(θ̂) ≈ (1/N) ∇L_test(θ̂)ᵀ H⁻¹ ∇ℓ_i(θ̂) = −(1/N) I_up,loss(z_i, z_test)

with ``I_up,loss(z, z_test) = −∇L_testᵀ H⁻¹ ∇ℓ(z)`` Koh & Liang's influence of upweighting
z. ``s_test = H⁻¹ ∇L_test`` is one ``nh.inverse_hvp`` (their trick), shared by every point.
Since the penalty sits inside each ℓ_n, leaving a point out is ordinary retraining on
the other N − 1 points with the same λ. Retraining runs Newton to ‖g‖ ≤ 1e-13.

The approximation is first order in the weight 1/N of a point: the error is O(1/N²)
against effects of O(1/N). So the script asserts close agreement with leave-one-out,
and exact agreement (to O(ε)) with the derivative ``d L_test / dε`` of the point's
weight 1 − ε, which is what the influence function is.

Run: ``python examples/influence.py``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nethessian.linalg._solve import inverse_hvp
from nethessian._newton import newton
from nethessian._objective import Objective
from nethessian.operators import HessianOperator

D64 = torch.float64


class L2Logistic(nn.Module):
    """Logistic regression whose output is ``[logit, ½λ‖w‖²]`` per sample (N, 2)."""

    def __init__(self, num_features: int, l2: float):
        super().__init__()
        self.linear = nn.Linear(num_features, 1).to(D64)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.l2 = float(l2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        logit = self.linear(X)
        penalty = 0.5 * self.l2 * (self.linear.weight**2).sum()
        return torch.cat([logit, penalty.expand_as(logit)], dim=1)


def bce(logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of a logit: ``softplus(z) − y z`` (stable for any z)."""
    return F.softplus(logit) - y * logit


def train_loss(weights: Optional[torch.Tensor] = None):
    """``(1/N) Σ_n w_n ℓ_n`` with ``ℓ_n = BCE_n + ½λ‖w‖²`` (all ``w_n = 1`` by default)."""

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_point = bce(out[:, 0], y) + out[:, 1]
        return per_point.mean() if weights is None else (weights * per_point).sum() / y.shape[0]

    return loss


def heldout_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy on test points (no penalty)."""
    return bce(out[:, 0], y).mean()


def make_data(n_train: int = 100, n_test: int = 5, num_features: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(num_features, generator=g, dtype=D64)
    X = torch.randn(n_train + n_test, num_features, generator=g, dtype=D64)
    p = torch.sigmoid(X @ w_true + 0.3)
    y = (torch.rand(n_train + n_test, generator=g, dtype=D64) < p).to(D64)
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])


def fit(model: nn.Module, data, weights=None) -> nn.Module:
    """A trained copy of ``model`` (Newton to ‖g‖ ≤ 1e-13); ``model`` itself is not changed."""
    res = newton(model, train_loss(weights), data, gtol=1e-13)
    assert res.converged, res.message
    return res.apply(copy.deepcopy(model))


@dataclass(frozen=True)
class InfluenceCheck:
    predicted: torch.Tensor  # Δ_i from the influence function, one per training point
    actual: torch.Tensor  # Δ_i from leave-one-out retraining
    derivative: torch.Tensor  # [L_test(θ̂_ε) − L_test(θ̂)] / ε, point i weighted 1 − ε (first few i)
    correlation: float
    relative_error: float  # max_i |predicted − actual| / max_i |actual|
    derivative_error: float  # max_i |derivative − predicted| / |predicted| over those points


def influence_vs_loo(
    n_train: int = 100,
    n_test: int = 5,
    num_features: int = 3,
    l2: float = 0.1,
    seed: int = 0,
    num_derivative: int = 3,
    eps: float = 1e-5,
) -> InfluenceCheck:
    """Predicted (influence function) and actual (leave-one-out) changes of the test loss."""
    train, test = make_data(n_train, n_test, num_features, seed)
    model = fit(L2Logistic(num_features, l2), train)
    H = HessianOperator(model, train_loss(), train)
    grad_test = Objective(model, heldout_loss, test).gradient()
    s_test = inverse_hvp(H, grad_test, tol=1e-12)  # H⁻¹ ∇L_test
    X, y = train
    grads = torch.stack(
        [Objective(model, train_loss(), (X[i : i + 1], y[i : i + 1])).gradient() for i in range(n_train)]
    )  # ∇ℓ_i(θ̂), (N, P)
    predicted = grads @ s_test / n_train  # Δ_i ≈ (1/N) ∇L_testᵀ H⁻¹ ∇ℓ_i
    base = Objective(model, heldout_loss, test).value()
    keep = lambda i: torch.arange(n_train) != i  # noqa: E731
    actual = torch.tensor(
        [Objective(fit(model, (X[keep(i)], y[keep(i)])), heldout_loss, test).value() - base for i in range(n_train)],
        dtype=D64,
    )
    deriv = []
    for i in range(num_derivative):  # weight 1 − ε on point i
        w = torch.ones(n_train, dtype=D64)
        w[i] = 1 - eps
        deriv.append((Objective(fit(model, train, w), heldout_loss, test).value() - base) / eps)
    derivative = torch.tensor(deriv, dtype=D64)
    corr = float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1])
    rel = float((predicted - actual).abs().max() / actual.abs().max())
    d_err = (
        float(((derivative - predicted[:num_derivative]).abs() / predicted[:num_derivative].abs()).max())
        if num_derivative
        else math.nan
    )
    return InfluenceCheck(predicted, actual, derivative, corr, rel, d_err)


def main() -> InfluenceCheck:
    res = influence_vs_loo()
    print(f"{'i':>3}  {'influence Δ_i':>14}  {'leave-one-out Δ_i':>18}")
    for i, (p, a) in enumerate(zip(res.predicted.tolist(), res.actual.tolist())):
        if i < 10:
            print(f"{i:>3}  {p:14.6e}  {a:18.6e}")
    print(
        f"... over {len(res.actual)} points: correlation {res.correlation:.6f}, "
        f"max |pred − LOO| / max |LOO| = {res.relative_error:.2e}, "
        f"vs the exact derivative (weight 1 − ε): {res.derivative_error:.1e}"
    )
    assert res.correlation > 0.999, res.correlation
    assert res.relative_error < 0.05, res.relative_error
    assert res.derivative_error < 1e-4, res.derivative_error
    return res


if __name__ == "__main__":
    main()
