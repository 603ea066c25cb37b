"""Damped Newton: steps against closed-form logistic regression, quadratic convergence, the demo net.

References are independent of nethessian: the logistic-regression gradient and Hessian
in closed form, ``torch.linalg.solve`` for the step, ``torch.autograd.functional.hessian``
for the two-layer network at its minimum.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cases import reference_hessian
from nethessian.errors import InputError
from nethessian.examples import two_layer
from nethessian._newton import NewtonIteration, NewtonResult, newton
from nethessian._quadratic import QuadraticModel

D64 = torch.float64


def logistic_problem(n=80, d=3, seed=0):
    """Non-separable labels: the mean cross-entropy is strictly convex with a finite minimiser."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D64)
    y = torch.rand(n, generator=g, dtype=D64) < torch.sigmoid(X @ torch.randn(d, generator=g, dtype=D64))
    torch.manual_seed(seed)
    model = nn.Linear(d, 1).to(D64)

    def loss_fn(out, t):  # mean of softplus(z) − y z: binary cross-entropy of the logit z
        z = out[:, 0]
        return (F.softplus(z) - t * z).mean()

    return model, loss_fn, (X, y.to(D64))


def closed_form(model, X, y):
    """g = X̃ᵀ(p − y)/N, H = X̃ᵀ diag(p(1 − p)) X̃ / N with X̃ = [X, 1] (weight then bias)."""
    Xt = torch.cat([X, torch.ones(len(X), 1, dtype=D64)], dim=1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    p = torch.sigmoid(Xt @ theta)
    return Xt.T @ (p - y) / len(y), Xt.T @ (Xt * (p * (1 - p))[:, None]) / len(y)


# ------------------------------------------------------------------ one step


@pytest.mark.parametrize("damping", (0.0, 1e-2, 1.0))
def test_step_matches_closed_form_logistic(damping):
    model, loss_fn, (X, y) = logistic_problem()
    g, H = closed_form(model, X, y)
    q = QuadraticModel(model, loss_fn, (X, y))
    torch.testing.assert_close(q.gradient, g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(q.operator.to_dense(), H, rtol=1e-12, atol=1e-14)
    step = q.newton_step(damping=damping, tol=1e-13)
    ref = torch.linalg.solve(H + damping * torch.eye(len(g), dtype=D64), -g)
    torch.testing.assert_close(step.step, ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ convergence


def test_quadratic_convergence_on_logistic_regression():
    model, loss_fn, (X, y) = logistic_problem()
    res = newton(model, loss_fn, (X, y), gtol=1e-13)
    assert res.converged and res.num_steps <= 10
    g, H = closed_form(res.apply(nn.Linear(3, 1).to(D64)), X, y)
    assert float(g.norm()) < 1e-13  # the closed-form gradient vanishes
    assert float(torch.linalg.eigvalsh(H)[0]) > 0  # at a strict minimum
    e = res.gradient_norms
    e = e[e > 1e-15]  # the last ‖g‖ sits at the rounding floor
    tail = e[e < 1e-1]  # the local phase
    assert len(tail) >= 4
    ratios2 = tail[1:] / tail[:-1] ** 2
    ratios1 = tail[1:] / tail[:-1]
    assert float(ratios2.max()) < 10.0  # e_{k+1} ≤ C e_k² with C ≈ 7.5 here
    assert float(ratios2.max() / ratios2.min()) < 3.0  # ... and C settles: quadratic, not faster
    assert float(ratios1[-1]) < 1e-4  # the linear rate collapses
    assert all(h.accepted for h in res.history)  # a convex problem: no rejection


def test_two_layer_demo_converges_to_a_degenerate_minimum():
    """9 parameters, 3 points: J → 0 on a manifold of exact fits, where H has rank ≤ 3."""
    model, loss_fn, data = two_layer(seed=0)
    res = newton(model, loss_fn, data)
    assert res.converged and res.gradient_norm < 1e-10 and res.value < 1e-20
    assert res.num_steps <= 25
    accepted = [h for h in res.history if h.accepted]
    assert all(a.value > b.value for a, b in zip(accepted, accepted[1:]))  # J decreases monotonically
    assert any(h.solver_status == "negative_curvature" for h in res.history)  # indefinite H on the way
    ref = reference_hessian(res.apply(two_layer(seed=0)[0]), loss_fn, data)
    eig = torch.linalg.eigvalsh(ref)
    assert int((eig.abs() > 1e-8 * eig.abs().max()).sum()) == 3  # singular: rank 3 at the minimum
    assert float(eig[0]) > -1e-12
    ratios = res.convergence_ratios(2)[-3:]  # quadratic at the end, despite rank 3
    assert float(ratios.max()) < 1e5
    assert float(res.convergence_ratios(1)[-1]) < 1e-4


@pytest.mark.parametrize("seed", range(1, 6))
def test_two_layer_other_seeds(seed):
    res = newton(*two_layer(seed=seed))
    assert res.converged and res.num_steps <= 25 and res.value < 1e-15


def test_linear_least_squares_one_step():
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(30, 4, generator=g, dtype=D64), torch.randn(30, 1, generator=g, dtype=D64)
    lin = nn.Linear(4, 1, bias=False).to(D64)
    res = newton(lin, nn.MSELoss(), (X, y), damping=1e-12)
    assert res.converged and res.num_steps <= 3  # inexact Newton: CG to rel. residual min(0.1, ‖g‖)
    torch.testing.assert_close(res.params["weight"][0], torch.linalg.lstsq(X, y).solution[:, 0])


# ------------------------------------------------------------------ the result object


def test_model_untouched_and_apply():
    model, loss_fn, data = two_layer(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = newton(model, loss_fn, data)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert res.apply(model) is model
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), res.params[n])
    with pytest.raises(InputError, match="W1"):
        res.apply(nn.Linear(2, 1))


def test_history_table_and_json():
    model, loss_fn, data = two_layer(seed=0)
    seen = []
    res = newton(model, loss_fn, data, callback=seen.append)
    assert isinstance(res, NewtonResult) and tuple(seen) == res.history
    assert all(isinstance(h, NewtonIteration) for h in res.history)
    assert res.num_steps == sum(h.accepted for h in res.history)
    text = res.table()
    assert str(res) == text
    lines = text.splitlines()
    assert "predicted" in lines[0] and "ρ" in lines[0] and "λ" in lines[0] and "‖g‖" in lines[0]
    assert len(lines) == len(res.history) + 3 and "converged" in lines[-1]
    assert "rejected (negative_curvature)" in text
    short = res.table(rejected=False).splitlines()
    assert len(short) == res.num_steps + 3 and "rejected" not in "".join(short)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["converged"] and len(d["history"]) == len(res.history)
    for h in res.history:  # the damping rule
        if h.accepted and h.ratio == h.ratio:
            assert h.actual_decrease == pytest.approx(h.ratio * h.predicted_decrease, rel=1e-12)


def test_not_converged_warns():
    model, loss_fn, data = two_layer(seed=0)
    with pytest.warns(UserWarning, match="max_steps = 2"):
        res = newton(model, loss_fn, data, max_steps=2)
    assert not res.converged and res.num_steps == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"damping": 0.0}, "damping"),
        ({"damping": -1.0}, "damping"),
        ({"gtol": -1.0}, "gtol"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"max_retries": -1}, "max_retries"),
        ({"min_factor": float("nan")}, "min_factor"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        newton(*two_layer(seed=0), **kwargs)


def test_already_converged_takes_no_step():
    model, loss_fn, data = two_layer(seed=0)
    first = newton(model, loss_fn, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = newton(first.apply(model), loss_fn, data)
    assert again.converged and again.num_steps == 0 and again.history == ()


# ------------------------------------------------------------------ one objective for the whole run


def test_newton_builds_one_objective(monkeypatch):
    """Every iterate is evaluated on one Objective (QuadraticModel.at), not a rebuilt copy."""
    import nethessian._objective as objective_module

    built, init = [], objective_module.Objective.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(objective_module.Objective, "__init__", counting)
    model, loss_fn, data = two_layer(seed=0)
    res = newton(model, loss_fn, data)
    assert res.converged and res.num_steps >= 5
    assert len(built) == 1
    # the result is the minimum: the gradient there, recomputed independently, vanishes
    res.apply(model)
    J = loss_fn(model(data[0]), data[1])
    g = torch.autograd.grad(J, list(model.parameters()))
    assert max(float(t.abs().max()) for t in g) < 1e-9


def test_quadratic_model_at_matches_a_fresh_one():
    model, loss_fn, data = logistic_problem()
    q = QuadraticModel(model, loss_fn, data)
    theta = q.theta + 0.1 * torch.linspace(-1, 1, q.size, dtype=D64)
    moved = q.at(theta)
    with torch.no_grad():  # the reference: a fresh model at θ, closed-form g and H
        model.weight.copy_(theta[:3].reshape(1, 3))
        model.bias.copy_(theta[3:])
    g, H = closed_form(model, *data)
    torch.testing.assert_close(moved.gradient, g, rtol=1e-12, atol=1e-14)
    d = torch.linspace(0.5, -0.5, q.size, dtype=D64)
    torch.testing.assert_close(moved.operator @ d, H @ d, rtol=1e-12, atol=1e-14)
    assert moved.objective.model is q.objective.model and torch.equal(moved.theta, theta)
    assert not torch.equal(q.theta, theta)  # the original is unchanged


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_steps": "5"}, "max_steps"),
        ({"gtol": "1e-3"}, "gtol"),
        ({"damping": True}, "damping"),
        ({"maxiter": 2.7}, "maxiter"),
        ({"maxiter": 0}, "maxiter"),
    ],
)
def test_options_that_are_not_numbers(kwargs, match):
    with pytest.raises(InputError, match=match):
        newton(*two_layer(seed=0), **kwargs)


def test_newton_from_a_quadratic_model_or_an_operator_reuses_its_objective(monkeypatch):
    import nethessian as nh
    from nethessian import _objective as objective_module

    model, loss_fn, data = two_layer(seed=0)
    ref = newton(model, loss_fn, data)
    op = nh.HessianOperator(model, loss_fn, data)
    q = QuadraticModel.from_operator(op)
    built, init = [], objective_module.Objective.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    monkeypatch.setattr(objective_module.Objective, "__init__", counting)
    for start in (q, op):
        res = newton(start)
        assert res.converged and res.num_steps == ref.num_steps
        for name in ref.params:
            torch.testing.assert_close(res.params[name], ref.params[name], rtol=1e-10, atol=1e-12)
    assert built == []  # nothing rebuilt
    with pytest.raises(InputError, match="leave out loss_fn"):
        newton(op, loss_fn)
    with pytest.raises(InputError, match="HessianOperator"):
        QuadraticModel.from_operator(nh.GGNOperator(model, loss_fn, data))
