"""QuadraticModel against independent references (float64).

* q(d) = J + gᵀd + ½dᵀHd with H from ``torch.autograd.functional.hessian`` and g from
  ``torch.autograd.grad`` of a hand-written J(θ) (``cases.reference_hessian``);
* q agrees with J to third order: log-log slope of |J(θ + αd) − q(αd)| ≈ 3;
* Newton steps against ``torch.linalg.solve(H + λI, −g)`` on the dense H;
* bad input: lengths, names, shapes, non-finite vectors, singular / indefinite systems, maxiter.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cases import CASES, reference_hessian
from nethessian.errors import InputError, NonFiniteError, NotConvergedError
from nethessian.examples import two_layer
from nethessian._objective import math_attention
from nethessian._quadratic import DIRECTIONS, NewtonStep, QuadraticComparison, QuadraticModel

D64 = torch.float64
SMOOTH = ("two_layer", "mlp_tanh_mse", "mlp_softplus_ce")


def reference(model, loss_fn, data):
    """(J, g, H) by brute force on a flat θ, independent of nethessian."""
    params = dict(model.named_parameters())
    names = list(params)
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()]).requires_grad_(True)
    parts = dict(
        zip(
            names,
            (
                t.reshape(p.shape)
                for t, p in zip(torch.split(theta, [p.numel() for p in params.values()]), params.values())
            ),
        )
    )
    with math_attention():
        J = loss_fn(torch.func.functional_call(model, parts, (data[0],)), data[1])
    (g,) = torch.autograd.grad(J, theta)
    return float(J.detach()), g, reference_hessian(model, loss_fn, data, names)


def rand(P, seed=0):
    return torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=D64)


@pytest.fixture(scope="module")
def demo():
    model, loss_fn, data = two_layer(seed=0)
    return model, loss_fn, data, QuadraticModel(model, loss_fn, data)


# ------------------------------------------------------------------ the model q(d)


@pytest.mark.parametrize("case", SMOOTH)
def test_q_matches_taylor_model_from_autograd(case):
    model, loss_fn, data = CASES[case]()
    J, g, H = reference(model, loss_fn, data)
    q = QuadraticModel(model, loss_fn, data)
    assert q.value == pytest.approx(J, rel=1e-12)
    torch.testing.assert_close(q.gradient, g, rtol=1e-10, atol=1e-12)
    for seed in range(3):
        d = rand(q.size, seed)
        expected = J + float(g @ d) + 0.5 * float(d @ H @ d)
        assert q(d) == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert q.change(d) == pytest.approx(expected - J, rel=1e-9, abs=1e-12)
        assert q(q.layout.unflatten(d)) == pytest.approx(q(d), rel=1e-14, abs=1e-15)  # named = flat
    assert q(torch.zeros(q.size, dtype=D64)) == q.value


def test_named_direction_may_leave_out_parameters(demo):
    *_, q = demo
    d = rand(q.size)
    only_w2 = torch.zeros_like(d)
    only_w2[q.layout.slice("W2")] = d[q.layout.slice("W2")]
    assert q({"W2": q.layout.unflatten(d)["W2"]}) == pytest.approx(q(only_w2), rel=1e-14)


@pytest.mark.parametrize("case", ("two_layer", "mlp_tanh_mse", "mlp_softplus_ce"))
def test_third_order_agreement(case):
    """|J(θ + αd) − q(αd)| = O(α³): the log-log slope over four decades is 3."""
    model, loss_fn, data = CASES[case]()
    q = QuadraticModel(model, loss_fn, data)
    d = rand(q.size, 7)
    alphas = torch.logspace(-3, -1, 7, dtype=D64) / float(d.norm())
    cmp = q.compare(d, alphas)
    assert isinstance(cmp, QuadraticComparison)
    assert cmp.slope == pytest.approx(3.0, abs=0.15)
    # the cubic coefficient is stable: difference / α³ varies by well under a factor 2
    c = cmp.difference / alphas**3
    assert float(c.abs().max() / c.abs().min()) < 1.5
    # and the independent J: the true values are the cost at θ + αd
    torch.testing.assert_close(cmp.true, torch.tensor([q.cost(a * d) for a in alphas], dtype=D64))
    torch.testing.assert_close(cmp.difference, cmp.true - cmp.model)


def test_compare_named_directions_and_json(demo):
    *_, q = demo
    for name in DIRECTIONS:
        cmp = q.compare(name)
        assert cmp.direction == name
        assert 2.7 < cmp.slope < 3.3, (name, cmp.slope)
        json.dumps(cmp.to_dict())
    g = q.direction("gradient")
    assert float(g.norm()) == pytest.approx(1.0) and float(g @ q.gradient) < 0  # unit descent
    top = q.direction("top-eigenvector")
    lam_max = float(torch.linalg.eigvalsh(q.operator.to_dense())[-1])
    assert float(top @ (q.operator @ top)) == pytest.approx(lam_max, rel=1e-8)


def test_quadratic_cost_is_exact():
    """Linear least squares is a quadratic: q(d) = J(θ + d) for every d."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g, dtype=D64), torch.randn(20, 2, generator=g, dtype=D64)
    lin = torch.nn.Linear(3, 2).to(D64)
    q = QuadraticModel(lin, torch.nn.MSELoss(reduction="sum"), (X, y))
    for s in range(3):
        d = 3 * rand(q.size, s)
        assert q(d) == pytest.approx(q.cost(d), rel=1e-12)


def test_snapshot_and_model_untouched():
    model, loss_fn, data = two_layer(seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = QuadraticModel(model, loss_fn, data)
    d = rand(q.size)
    v = q(d)
    q.compare("random"), q.newton_step(damping=1.0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    with torch.no_grad():
        model.W1.add_(1.0)  # a later change to the model does not move the snapshot
    assert q(d) == v


# ------------------------------------------------------------------ Newton steps


@pytest.mark.parametrize(
    "case, damping", [("two_layer", 0.5), ("two_layer", 2.0), ("mlp_tanh_mse", 0.5), ("mlp_softplus_ce", 2.0)]
)
def test_newton_step_matches_dense_solve(case, damping):
    model, loss_fn, data = CASES[case]()
    J, g, H = reference(model, loss_fn, data)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    damping = damping + max(0.0, -lam_min)  # H + λI positive definite
    q = QuadraticModel(model, loss_fn, data)
    step = q.newton_step(damping=damping, tol=1e-12)
    ref = torch.linalg.solve(H + damping * torch.eye(len(g), dtype=D64), -g)
    torch.testing.assert_close(step.step, ref, rtol=1e-8, atol=1e-10)
    assert step.positive_definite and step.converged and step.solve.method == "cg"
    assert step.predicted_decrease == pytest.approx(J - q(step.step), rel=1e-9, abs=1e-14)
    assert step.predicted_decrease > 0
    assert step.step_by_name.keys() == dict(model.named_parameters()).keys()
    json.dumps(step.to_dict())


def test_newton_step_indefinite_falls_back_to_minres(demo):
    model, loss_fn, data, q = demo
    _, g, H = reference(model, loss_fn, data)
    assert float(torch.linalg.eigvalsh(H)[0]) < 0  # a saddle region here
    step = q.newton_step()  # undamped, method="auto"
    assert isinstance(step, NewtonStep) and not step.positive_definite and step.solve.method == "minres"
    torch.testing.assert_close(step.step, torch.linalg.solve(H, -g), rtol=1e-7, atol=1e-9)
    p = step.negative_curvature_direction
    assert float(p @ H @ p) <= 0 and float(p.norm()) == pytest.approx(1.0)
    assert q.newton_step(method="minres").positive_definite is None  # not tested by MINRES
    with pytest.raises(NotConvergedError, match="not positive definite") as err:
        q.newton_step(method="cg")
    assert isinstance(err.value.result, NewtonStep) and err.value.result.solve.status == "negative_curvature"


def test_negative_damping_singular_system_is_refused(demo):
    *_, q = demo
    H = q.operator.to_dense()
    lam = float(torch.linalg.eigvalsh(H)[-1])
    for method in ("auto", "cg", "minres"):  # H − λ_max I: singular, indefinite
        with pytest.raises(NotConvergedError) as err:
            q.newton_step(damping=-lam, method=method)
        assert "residual" in str(err.value)


def test_maxiter_is_flagged_with_residual(demo):
    *_, q = demo
    with pytest.raises(NotConvergedError, match="maxiter") as err:
        q.newton_step(damping=1.0, maxiter=1)
    res = err.value.result.solve
    assert res.status == "maxiter" and res.final_residual > 1e-10
    assert f"{res.final_residual:.3e}" in str(err.value)


# ------------------------------------------------------------------ bad input


def test_bad_directions(demo):
    *_, q = demo
    with pytest.raises(InputError, match=r"\(9,\)"):
        q(torch.zeros(8, dtype=D64))
    with pytest.raises(InputError, match="P = 9"):
        q(torch.zeros(9, 2, dtype=D64))
    with pytest.raises(InputError, match="unknown parameter name.*W3"):
        q({"W3": torch.zeros(3)})
    with pytest.raises(InputError, match="expected \\(2, 3\\)"):
        q({"W1": torch.zeros(3, 2)})
    with pytest.raises(InputError, match="empty"):
        q({})
    bad = torch.zeros(9, dtype=D64)
    bad[3] = math.nan
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        q(bad)
    with pytest.raises(NonFiniteError):
        q.compare(bad)
    with pytest.raises(InputError, match="unknown direction"):
        q.compare("hessian")
    with pytest.raises(InputError, match="alphas"):
        q.compare("random", [1.0, math.inf])
    with pytest.raises(InputError, match="unknown method"):
        q.newton_step(method="lu")
    with pytest.raises(InputError, match="damping"):
        q.newton_step(damping=math.nan)


# ------------------------------------------------------------------ figure


def test_plot_writes_a_png(demo, tmp_path):
    from matplotlib.image import imread

    *_, q = demo
    path = q.plot(tmp_path / "q.png", num=11)
    img = imread(path)
    assert img.ndim == 3 and img.shape[1] > 2 * img.shape[0]  # three panels side by side
    one = q.plot(tmp_path / "one.png", rand(q.size), radius=0.5, num=5)
    assert imread(one).shape[0] > 0
    with pytest.raises(InputError, match="radius"):
        q.plot(tmp_path / "bad.png", radius=0)


def test_plot_delegates_to_the_shared_figure(demo, tmp_path, monkeypatch):
    from nethessian import _plots

    *_, q = demo
    seen = []
    original = _plots.quadratic_plot
    monkeypatch.setattr(_plots, "quadratic_plot", lambda cmps, *a, **k: seen.append(cmps) or original(cmps, *a, **k))
    q.plot(tmp_path / "q.png", ("gradient", "random"), num=7)
    assert len(seen) == 1 and [c.direction for c in seen[0]] == ["gradient", "random"]
    assert float(seen[0][0].alphas[3]) == 0.0  # the middle of the grid is exactly 0


@pytest.mark.parametrize("num", [2, 5, 41, 40])
def test_symmetric_grid(num):
    from nethessian._quadratic import symmetric_grid

    a = symmetric_grid(2.5, num)
    assert a.shape == (num,) and float(a[0]) == -2.5 and float(a[-1]) == 2.5
    assert torch.equal(a, -a.flip(0))  # mirrored exactly
    torch.testing.assert_close(a, torch.linspace(-2.5, 2.5, num, dtype=D64), rtol=0, atol=1e-15)
    if num % 2:
        assert float(a[num // 2]) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"radius": "1"}, "radius"), ({"num": 2.5}, "num"), ({"num": 1}, "num"), ({"seed": "abc"}, "seed")],
)
def test_plot_options_that_are_not_numbers(demo, tmp_path, kwargs, match):
    *_, q = demo
    with pytest.raises(InputError, match=match):
        q.plot(tmp_path / "bad.png", **kwargs)


@pytest.mark.parametrize(
    "kwargs, match", [({"damping": "0.1"}, "damping"), ({"tol": "1e-3"}, "tol"), ({"maxiter": 2.7}, "maxiter")]
)
def test_newton_step_options_that_are_not_numbers(demo, kwargs, match):
    *_, q = demo
    with pytest.raises(InputError, match=match):
        q.newton_step(**kwargs)
