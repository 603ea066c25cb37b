"""nh.influence: scores of every training point (src/nethessian/_influence.py), float64.

Independent references:
* leave-one-out retraining (Newton to ‖g‖ ≤ 1e-13) on the example's L2 logistic regression
  (examples/influence.py: its problem, not its influence code);
* ``−G_ref (H_ref + λI)⁻¹ ∇L_test`` with H_ref from ``torch.autograd.functional.hessian`` and
  G_ref from a loop of ``torch.autograd.grad``, solved by ``torch.linalg.solve``;
* a central difference in λ for the reported damping sensitivity.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

from nethessian._influence import influence, per_sample_gradients
from nethessian._objective import Objective
from nethessian.errors import InputError

D64 = torch.float64
PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "influence.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("influence_example_scores", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def logistic(ex):
    train, test = ex.make_data(n_train=40, seed=3)
    return ex.fit(ex.L2Logistic(3, 0.1), train), train, test


def _mlp(seed=0, d_in=3, d_out=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, d_out)).to(D64)


def _flat_fn(model, fn):
    """``theta ↦ fn(named parameters)`` for a flat θ, written without nethessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def call(theta):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.tensor(s).prod()) if len(s) else 1
            parts[n] = theta[i : i + k].reshape(s)
            i += k
        return fn(parts)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return call, theta


def _reference(model, loss, train, test, test_loss, damping):
    """``(scores, H)``: −G (H + λI)⁻¹ ∇L_test with autograd.functional.hessian and a loop of autograd.grad."""
    (X, y), (Xt, yt) = train, test
    J, theta = _flat_fn(model, lambda p: loss(functional_call(model, p, (X,)), y))
    H = torch.autograd.functional.hessian(J, theta)
    Lt, _ = _flat_fn(model, lambda p: test_loss(functional_call(model, p, (Xt,)), yt))
    th = theta.clone().requires_grad_(True)
    (g_test,) = torch.autograd.grad(Lt(th), th)
    rows = []
    for i in range(len(y)):
        li, _ = _flat_fn(model, lambda p, i=i: loss(functional_call(model, p, (X[i : i + 1],)), y[i : i + 1]))
        rows.append(torch.autograd.grad(li(th), th)[0])
    G = torch.stack(rows)
    s = torch.linalg.solve(H + damping * torch.eye(len(theta), dtype=D64), g_test)
    return -G @ s, H


# -- correctness -----------------------------------------------------------------------------
def test_removal_effect_matches_leave_one_out(ex):
    """N = 100 (LOO's O(1/N²) gap is ~5 % there): correlation, scale (slope ≈ 1), signs, helpful/harmful."""
    train, test = ex.make_data(n_train=100, seed=0)
    model = ex.fit(ex.L2Logistic(3, 0.1), train)
    X, y = train
    res = influence(model, ex.train_loss(), train, test, test_loss_fn=ex.heldout_loss, method="cg")
    N = len(y)
    torch.testing.assert_close(res.weights, torch.full((N,), 1 / N, dtype=D64))
    base = Objective(model, ex.heldout_loss, test).value()
    actual = []
    for i in range(N):
        keep = torch.arange(N) != i
        actual.append(Objective(ex.fit(model, (X[keep], y[keep])), ex.heldout_loss, test).value() - base)
    actual = torch.tensor(actual, dtype=D64)
    pred = res.removal_effect
    corr = float(torch.corrcoef(torch.stack([pred, actual]))[0, 1])
    assert corr > 0.99, corr
    assert float((pred - actual).abs().max() / actual.abs().max()) < 0.05
    assert float(pred @ actual / (pred @ pred)) == pytest.approx(1.0, abs=0.05)  # same scale
    big = actual.abs() > 0.1 * actual.abs().max()  # where LOO is well above its O(1/N²) error
    assert bool((pred[big].sign() == actual[big].sign()).all())
    # helpful (score < 0) means leaving the point out raises the test loss
    assert bool((actual[res.helpful(3)] > 0).all()) and bool((actual[res.harmful(3)] < 0).all())


def test_score_is_the_exact_derivative_of_the_test_loss(ex, logistic):
    """Weight (1 − ε)/N on point i: [L_test(θ̂_ε) − L_test(θ̂)]/ε → −w_i score_i = removal_effect (O(ε))."""
    model, train, test = logistic
    res = influence(model, ex.train_loss(), train, test, test_loss_fn=ex.heldout_loss, method="dense")
    base, eps, N = Objective(model, ex.heldout_loss, test).value(), 1e-5, len(train[1])
    for i in (0, 13, 33):
        w = torch.ones(N, dtype=D64)
        w[i] = 1 - eps
        deriv = (Objective(ex.fit(model, train, w), ex.heldout_loss, test).value() - base) / eps
        assert deriv == pytest.approx(float(res.removal_effect[i]), rel=1e-4)


@pytest.mark.parametrize("method", ["cg", "minres", "dense", "auto"])
def test_matches_dense_solve_on_logistic(ex, logistic, method):
    model, train, test = logistic
    damping = 0.03
    res = influence(
        model, ex.train_loss(), train, test, test_loss_fn=ex.heldout_loss, damping=damping, method=method, tol=1e-13
    )
    ref, _ = _reference(model, ex.train_loss(), train, test, ex.heldout_loss, damping)
    torch.testing.assert_close(res.scores, ref, rtol=1e-8, atol=1e-10)
    assert res.converged and res.residual < 1e-12 and res.damping == damping
    assert res.method == ("dense" if method == "auto" else method)


def test_matches_dense_solve_on_damped_nonconvex_mlp():
    """An MLP at random weights (H indefinite) with damping beyond |λ_min|; mean MSE, 2 outputs."""
    model = _mlp(1)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(25, 3, generator=g, dtype=D64), torch.randn(25, 2, generator=g, dtype=D64)
    test = (torch.randn(4, 3, generator=g, dtype=D64), torch.randn(4, 2, generator=g, dtype=D64))
    _, H = _reference(model, nn.MSELoss(), (X, y), test, nn.MSELoss(), 0.0)
    lmin = float(torch.linalg.eigvalsh(H)[0])
    assert lmin < 0  # the point of this test
    damping = abs(lmin) + 0.5
    ref, _ = _reference(model, nn.MSELoss(), (X, y), test, nn.MSELoss(), damping)
    for method in ("cg", "dense"):
        res = influence(model, nn.MSELoss(), (X, y), test, damping=damping, method=method, tol=1e-13)
        torch.testing.assert_close(res.scores, ref, rtol=1e-8, atol=1e-10)
    assert res.min_eigenvalue == pytest.approx(lmin, rel=1e-8)


def test_per_sample_gradients_match_autograd_loop():
    """CrossEntropy with ignore_index: ragged chunks of 3; an ignored sample has c_i = 0 and no gradient."""
    model = _mlp(2, d_out=3)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(10, 3, generator=g, dtype=D64), torch.randint(0, 3, (10,), generator=g)
    y[4] = -100
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    obj = Objective(model, loss, (X, y))
    chunks = list(per_sample_gradients(obj, chunk_size=3))
    assert [c[0] for c in chunks] == [0, 3, 6, 9]
    G = torch.cat([c[1] for c in chunks])
    counts = torch.cat([c[3] for c in chunks])
    assert counts.tolist() == [1.0] * 4 + [0.0] + [1.0] * 5
    for i in range(10):
        if i == 4:
            assert float(G[i].abs().max()) == 0.0
            continue
        model.zero_grad()
        loss(model(X[i : i + 1]), y[i : i + 1]).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(G[i], ref, rtol=1e-12, atol=1e-14)
    res = influence(model, loss, (X, y), (X[:3], y[:3]), damping=1.0, method="dense")
    assert float(res.scores[4]) == 0.0 and float(res.weights[4]) == 0.0
    torch.testing.assert_close(res.weights.sum(), torch.tensor(1.0, dtype=D64))


def test_independent_of_batch_split():
    model = _mlp(3)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(23, 3, generator=g, dtype=D64), torch.randn(23, 2, generator=g, dtype=D64)
    test = (X[:5] + 0.1, y[:5])
    one = influence(model, nn.MSELoss(), (X, y), test, damping=2.0, method="cg", tol=1e-13)
    ragged = [(X[:7], y[:7]), (X[7:8], y[7:8]), (X[8:], y[8:])]
    split = influence(model, nn.MSELoss(), ragged, test, damping=2.0, method="cg", tol=1e-13, chunk_size=4)
    torch.testing.assert_close(split.scores, one.scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.weights, one.weights, rtol=1e-12, atol=0)
    summed = influence(model, nn.MSELoss(reduction="sum"), ragged, test, damping=60.0, method="dense")
    assert torch.equal(summed.weights, torch.ones(23, dtype=D64))


def test_damping_sensitivity_is_the_log_derivative(ex, logistic):
    model, train, test = logistic
    lam, h = 0.05, 1e-4
    kw = dict(test_loss_fn=ex.heldout_loss, method="dense")
    res = influence(model, ex.train_loss(), train, test, damping=lam, **kw)
    up = influence(model, ex.train_loss(), train, test, damping=lam * (1 + h), **kw).scores
    down = influence(model, ex.train_loss(), train, test, damping=lam * (1 - h), **kw).scores
    fd = float(((up - down) / (2 * h)).norm() / res.scores.norm())
    assert res.damping_sensitivity == pytest.approx(fd, rel=1e-6)
    assert 0 < res.damping_sensitivity < 1
    assert influence(model, ex.train_loss(), train, test, **kw).damping_sensitivity == 0.0


# -- indefinite H --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indefinite():
    model = _mlp(1)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(25, 3, generator=g, dtype=D64), torch.randn(25, 2, generator=g, dtype=D64)
    return model, (X, y), (X[:4], y[:4])


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_indefinite_hessian_is_refused_with_the_fix(indefinite, method):
    model, train, test = indefinite
    with pytest.raises(InputError, match=r"not positive definite.*damping"):
        influence(model, nn.MSELoss(), train, test, method=method)


def test_minres_on_indefinite_hessian_warns(indefinite):
    model, train, test = indefinite
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        influence(model, nn.MSELoss(), train, test, method="minres", tol=1e-12)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping=-0.1), "damping must be ≥ 0"),
        (dict(damping="1e-3"), "damping must be a number"),
        (dict(method="lissa"), "unknown method"),
        (dict(tol=0.0), "tol must be positive"),
        (dict(chunk_size=2.5), "chunk_size must be a whole number"),
    ],
)
def test_bad_options(ex, logistic, kwargs, match):
    model, train, test = logistic
    with pytest.raises(InputError, match=match):
        influence(model, ex.train_loss(), train, test, test_loss_fn=ex.heldout_loss, **kwargs)


def test_bad_data():
    model = _mlp(0)
    X, y = torch.randn(10, 3, dtype=D64), torch.randn(10, 2, dtype=D64)
    with pytest.raises(InputError, match="empty"):
        influence(model, nn.MSELoss(), (X, y), [], damping=1.0)
    bad = (torch.randn(10, 3, dtype=D64), torch.randn(9, 2, dtype=D64))
    with pytest.raises(InputError, match="shape"):
        influence(model, nn.MSELoss(), bad, (X, y), damping=1.0)
    with pytest.raises(InputError, match="10 samples"):  # inputs 12 rows, targets 10
        influence(
            model, lambda o, t: ((o[:10] - t) ** 2).mean(), (torch.randn(12, 3, dtype=D64), y), (X, y), damping=1.0
        )


def test_cost_that_is_not_a_sum_of_sample_terms_is_refused():
    model = _mlp(0)
    X, y = torch.randn(10, 3, dtype=D64), torch.randn(10, 2, dtype=D64)
    with pytest.raises(InputError, match="not the weighted sum"):  # √mean: no per-sample terms
        influence(model, lambda o, t: ((o - t) ** 2).mean().sqrt(), (X, y), (X, y), damping=1e3, method="cg")
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(D64).train()
    with pytest.raises(InputError, match="batch norm in train mode"):
        influence(bn, nn.MSELoss(), (X, y), (X, y), damping=1.0)


# -- printing, progress -------------------------------------------------------------------------
def test_repr_table_and_dict(ex, logistic):
    model, train, test = logistic
    res = influence(model, ex.train_loss(), train, test, test_loss_fn=ex.heldout_loss, damping=0.01)
    text = repr(res)
    assert "\n" not in text and len(text) < 250 and "N=40" in text
    lines = res.table(top=4).splitlines()
    assert len(lines) == 9 and lines[1].startswith("helpful") and lines[-1].startswith("harmful")
    h = res.helpful(4)
    assert bool((res.scores[h][:-1] <= res.scores[h][1:]).all()) and float(res.scores[h[0]]) == float(res.scores.min())
    assert float(res.scores[res.harmful(1)[0]]) == float(res.scores.max())
    d = json.loads(json.dumps(res.to_dict()))
    assert len(d["scores"]) == 40 and d["method"] == "dense"


def test_progress_lines_in_a_log(ex, logistic, monkeypatch):
    model, train, test = logistic
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    influence(model, ex.train_loss(), train, test, test_loss_fn=ex.heldout_loss, method="cg", progress=True)
    assert "per-sample gradients 40/40 sample" in log.getvalue()


class _TwoInputs(nn.Module):
    """``model(a=..., b=...)``: inputs as a dict of tensors."""

    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(3, 2).to(D64), nn.Linear(1, 2).to(D64)

    def forward(self, a, b):
        return torch.tanh(self.f(a)) + self.g(b)


def test_dict_inputs_and_float32():
    torch.manual_seed(4)
    model = _TwoInputs()
    g = torch.Generator().manual_seed(4)
    a, b, y = (
        torch.randn(12, 3, generator=g, dtype=D64),
        torch.randn(12, 1, generator=g, dtype=D64),
        torch.randn(12, 2, generator=g, dtype=D64),
    )
    train, test = ({"a": a, "b": b}, y), ({"a": a[:3], "b": b[:3]}, y[:3])
    res = influence(model, nn.MSELoss(), train, test, damping=5.0, method="cg", tol=1e-13)
    loss = nn.MSELoss()
    Jf, theta = _flat_fn(model, lambda p: loss(functional_call(model, p, (), {"a": a, "b": b}), y))
    H = torch.autograd.functional.hessian(Jf, theta)
    th = theta.clone().requires_grad_(True)
    Lt, _ = _flat_fn(model, lambda p: loss(functional_call(model, p, (), {"a": a[:3], "b": b[:3]}), y[:3]))
    s = torch.linalg.solve(H + 5.0 * torch.eye(len(theta), dtype=D64), torch.autograd.grad(Lt(th), th)[0])
    for i in (0, 11):
        li, _ = _flat_fn(
            model, lambda p: loss(functional_call(model, p, (), {"a": a[i : i + 1], "b": b[i : i + 1]}), y[i : i + 1])
        )
        (gi,) = torch.autograd.grad(li(th), th)
        assert float(res.scores[i]) == pytest.approx(float(-gi @ s), rel=1e-8)
    res32 = influence(model.float(), nn.MSELoss(), train, test, damping=5.0, method="cg")
    assert res32.scores.dtype == torch.float32
    torch.testing.assert_close(res32.scores.double(), res.scores, rtol=1e-4, atol=1e-5 * float(res.scores.abs().max()))
