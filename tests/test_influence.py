"""The influence-function example (examples/influence.py) against leave-one-out retraining.

L2-regularised logistic regression, float64. Checked independently:

* the Hessian and per-point gradients nethessian uses equal the closed forms
  H = X̃ᵀSX̃/N + λ diag(1, …, 1, 0), ∇ℓ_i = (p_i − y_i) x̃_i + λ (w, 0);
* the influence predictions against exact leave-one-out retraining (Newton to ‖g‖ ≤ 1e-13):
  correlation and relative error over all 100 training points;
* first order means the error is second order: removing a fraction t of point i, the
  gap between t·Δ_i and the retrained change shrinks like t².
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

from nethessian._objective import Objective
from nethessian.operators import HessianOperator

D64 = torch.float64
PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "influence.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("influence_example", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def fitted(ex):
    train, test = ex.make_data(n_train=40, seed=3)
    model = ex.fit(ex.L2Logistic(3, 0.1), train)
    return ex, model, train, test


def test_example_runs_and_agrees_with_leave_one_out(ex, capsys):
    res = ex.main()  # asserts inside; prints the table
    assert "correlation" in capsys.readouterr().out
    assert res.predicted.shape == res.actual.shape == (100,)
    assert res.correlation > 0.999
    assert res.relative_error < 0.05
    assert res.derivative_error < 1e-4
    assert (res.predicted.sign() == res.actual.sign()).float().mean() > 0.95


def test_hessian_and_gradients_match_closed_form(fitted):
    ex, model, (X, y), _ = fitted
    lam, N = model.l2, len(y)
    w, b = model.linear.weight.detach()[0], model.linear.bias.detach()
    Xt = torch.cat([X, torch.ones(N, 1, dtype=D64)], dim=1)
    p = torch.sigmoid(X @ w + b)
    reg = torch.diag(torch.tensor([lam] * X.shape[1] + [0.0], dtype=D64))
    H = Xt.T @ (Xt * (p * (1 - p))[:, None]) / N + reg
    torch.testing.assert_close(HessianOperator(model, ex.train_loss(), (X, y)).to_dense(), H, rtol=1e-12, atol=1e-14)
    for i in (0, 7):
        gi = (p[i] - y[i]) * Xt[i] + torch.cat([lam * w, torch.zeros(1, dtype=D64)])
        got = Objective(model, ex.train_loss(), (X[i : i + 1], y[i : i + 1])).gradient()
        torch.testing.assert_close(got, gi, rtol=1e-12, atol=1e-14)
    full = Objective(model, ex.train_loss(), (X, y)).gradient()
    assert float(full.norm()) < 1e-13  # θ̂ is the minimiser: Σ ∇ℓ_i = 0


def test_removal_error_is_second_order(fitted):
    """Weight 1 − t on point i: |t·Δ_i − (L_test(θ̂_t) − L_test(θ̂))| = O(t²)."""
    ex, model, (X, y), test = fitted
    from nethessian.linalg._solve import inverse_hvp

    N, i = len(y), 5
    s_test = inverse_hvp(
        HessianOperator(model, ex.train_loss(), (X, y)), Objective(model, ex.heldout_loss, test).gradient(), tol=1e-12
    )
    grad_i = Objective(model, ex.train_loss(), (X[i : i + 1], y[i : i + 1])).gradient()
    delta = float(grad_i @ s_test) / N
    base = Objective(model, ex.heldout_loss, test).value()
    ts = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=D64)
    gaps = []
    for t in ts.tolist():
        w = torch.ones(N, dtype=D64)
        w[i] = 1 - t
        actual = Objective(ex.fit(model, (X, y), w), ex.heldout_loss, test).value() - base
        gaps.append(abs(t * delta - actual))
    gaps = torch.tensor(gaps, dtype=D64)
    slope = float(
        torch.linalg.lstsq(torch.stack([ts.log(), torch.ones(4, dtype=D64)], 1), gaps.log()[:, None]).solution[0, 0]
    )
    assert slope == pytest.approx(2.0, abs=0.15)
    assert float(gaps[0]) < 0.1 * abs(delta)  # leave-one-out itself (t = 1) is close


def test_example_does_not_change_its_model(fitted):
    ex, model, train, _ = fitted
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex.fit(model, train)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
