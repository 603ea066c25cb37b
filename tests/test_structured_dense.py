"""The structured engine's dense Hessian by Kronecker factors (``structured/_kron``), in float64.

Every case (kept as data in ``DENSE_CASES``) runs ``nh.hessian`` under ``engine="auto"``,
checks that the Kronecker path ran, and compares with
``torch.autograd.functional.hessian`` of a hand-written ``J(θ)`` over the chosen
parameters (an independent reference: no nethessian code on its path). Plus the
two-layer network's a, b, c blocks against the closed forms of
``docs/two-layer-hessian.md``, the engine choice and its stated reasons, and the
capability protocol (``base.structured``) without operator classes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import nethessian as nh
from nethessian._objective import Objective
from nethessian.errors import InputError
from nethessian.structured import StructuredEngine, offer, select
from structured_cases import Residual  # y = W2 (x + tanh(W1 x)): a graph, not a chain

D = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _labels(n, c, seed=2):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _mlp(sizes=(8, 6, 5, 3), act=nn.Tanh, bias=True, seed=0):
    """The 64-48-32-10 MLP of the benchmark, at small size."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b, bias=bias)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(D)


class Functional(nn.Module):
    """Dense layers written as ``F.linear`` and ``x @ W`` on raw parameters."""

    def __init__(self):
        super().__init__()
        self.W1, self.b1 = nn.Parameter(_x(4, 3, seed=5)), nn.Parameter(_x(4, seed=6))
        self.W2 = nn.Parameter(_x(4, 2, seed=7))

    def forward(self, x):
        return torch.sigmoid(F.linear(x, self.W1, self.b1)) @ self.W2


def _ce(**kw):
    return _mlp(), nn.CrossEntropyLoss(**kw), (_x(9, 8), _labels(9, 3)), None


def _act(act):
    return _mlp(act=act), nn.MSELoss(reduction="sum"), (_x(7, 8), _x(7, 3, seed=3)), None


DENSE_CASES = {
    "mlp-ce-mean": lambda: _ce(),
    "mlp-no-bias": lambda: (_mlp(bias=False), nn.CrossEntropyLoss(), (_x(9, 8), _labels(9, 3)), None),
    **{
        f"act-{a.__name__.lower()}": (lambda a=a: _act(a)) for a in (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.GELU, nn.Softplus)
    },
    "mse-mean": lambda: (_mlp(act=nn.Sigmoid), nn.MSELoss(), (_x(6, 8), _x(6, 3, seed=3)), None),
    "ce-smoothing-weights-ignore": lambda: _ce(
        weight=torch.tensor([0.5, 2.0, 1.0], dtype=D), ignore_index=1, label_smoothing=0.1
    ),
    "linear-3d-inputs": lambda: (_mlp((3, 4, 2)), nn.MSELoss(), (_x(4, 5, 3), _x(4, 5, 2, seed=3)), None),
    "param-subset": lambda: (
        _mlp(),
        nn.CrossEntropyLoss(),
        (_x(9, 8), _labels(9, 3)),
        ["0.weight", "2.bias", "4.weight"],
    ),
    "ragged-batches": lambda: (
        _mlp(),
        nn.CrossEntropyLoss(),
        [(_x(9, 8)[:5], _labels(9, 3)[:5]), (_x(9, 8)[5:], _labels(9, 3)[5:])],
        None,
    ),
    "residual-graph": lambda: (_seeded(Residual), nn.MSELoss(), (_x(5, 3), _x(5, 2, seed=3)), None),
    "functional-linear-and-matmul": lambda: (Functional(), nn.MSELoss(), (_x(6, 3), _x(6, 2, seed=3)), None),
    "functional-3d-inputs": lambda: (Functional(), nn.MSELoss(), (_x(4, 5, 3), _x(4, 5, 2, seed=3)), None),
}


def _seeded(cls):
    torch.manual_seed(0)
    return cls().to(D)


def _reference(model, loss, data, names):
    """``torch.autograd.functional.hessian`` of J(θ) over ``names`` (all batches concatenated)."""
    if isinstance(data, list):
        data = (torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))
    X, y = data
    params = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in params.items()}
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def J(t):
        parts = torch.split(t, [params[n].numel() for n in names])
        named = {**fixed, **{n: p.reshape(params[n].shape) for n, p in zip(names, parts)}}
        return loss(functional_call(model, named, (X,)), y)

    return torch.autograd.functional.hessian(J, theta)


@pytest.mark.parametrize("name", sorted(DENSE_CASES))
def test_kronecker_dense_equals_autograd_hessian(name):
    model, loss, data, params = DENSE_CASES[name]()
    H = nh.hessian(model, loss, data, params)
    assert H.engine == "structured" and "Kronecker" in H.engine_reason
    ref = _reference(model, loss, data, list(H.names))
    torch.testing.assert_close(H.dense, ref, **TOL)


def test_two_layer_blocks_equal_closed_forms():
    """The demo network (z2 = X W1, a2 = f(z2), z3 = a2 W2, ŷ = f(z3), J = ½Σ(y−ŷ)²): a, b, c by hand."""
    model, loss, (X, y) = nh.examples.two_layer(seed=1)
    H = nh.hessian(model, loss, (X, y))
    assert H.engine == "structured" and "Kronecker" in H.engine_reason
    W1, W2 = model.W1.detach(), model.W2.detach()[:, 0]
    a2 = torch.sigmoid(X @ W1)
    yhat = torch.sigmoid(a2 @ W2)
    f3, f3p = yhat * (1 - yhat), yhat * (1 - yhat) * (1 - 2 * yhat)  # f'(z3), f''(z3)
    f2, f2p = a2 * (1 - a2), a2 * (1 - a2) * (1 - 2 * a2)
    d3 = -(y[:, 0] - yhat) * f3  # δ3 = ∂J/∂z3
    h3 = f3**2 - (y[:, 0] - yhat) * f3p  # ∂²J/∂z3²
    c = torch.einsum("n,nj,nk->jk", h3, a2, a2)
    # ∂²J/∂z2_j∂z2_k = h3 W2_j W2_k f'(z2_j) f'(z2_k) + δ3 W2_j f''(z2_j) δ_jk
    Hz2 = torch.einsum("n,j,k,nj,nk->njk", h3, W2, W2, f2, f2) + torch.diag_embed(d3[:, None] * W2 * f2p)
    a = torch.einsum("njk,ni,nl->ijlk", Hz2, X, X).reshape(6, 6)
    eye = torch.eye(3, dtype=D)
    b = torch.einsum("ni,nj,n,nk->ijk", X, f2 * W2, h3, a2) + torch.einsum("ni,nj,n,jk->ijk", X, f2, d3, eye)
    torch.testing.assert_close(H["W1", "W1"], a, **TOL)
    torch.testing.assert_close(H["W1", "W2"], b.reshape(6, 3), **TOL)
    torch.testing.assert_close(H["W2", "W2"], c, **TOL)


def test_auto_dense_picks_structured_on_a_chain_and_says_why():
    model, loss, data, _ = _ce()
    op = nh.HessianOperator(model, loss, data)
    chosen, why = select(op, "auto", "dense")
    assert chosen is op.structured and chosen.kron
    assert why.startswith("structured:") and "Kronecker" in why and "nn.Linear" in why


def test_auto_dense_keeps_autodiff_where_a_layer_is_not_dense_and_names_it():
    """LayerNorm's affine parameters are not a dense layer: per-sample Jacobians, slower, so autodiff."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    data = (_x(5, 3), _x(5, 2, seed=3))
    H = nh.hessian(model, nn.MSELoss(), data)
    assert H.engine == "autodiff" and "'1'" in H.engine_reason and "slower" in H.engine_reason
    forced = nh.hessian(model, nn.MSELoss(), data, engine="structured")
    assert forced.engine == "structured" and "per-sample parameter Jacobians" in forced.engine_reason
    torch.testing.assert_close(forced.dense, H.dense, **TOL)
    # the same model with only the Linear layers chosen is all dense layers again
    sub = nh.hessian(model, nn.MSELoss(), data, ["0.*", "3.*"])
    assert sub.engine == "structured"
    torch.testing.assert_close(sub.dense, _reference(model, nn.MSELoss(), data, list(sub.names)), **TOL)


class _Base:
    """A duck-typed base: anything with ``structured`` (and ``structured_reason``) offers the engine."""

    def __init__(self, structured, reason=""):
        self.structured, self.structured_reason = structured, reason


def test_capability_protocol_needs_no_operator_classes():
    model, loss, data, _ = _ce()
    engine = StructuredEngine(Objective(model, loss, data))
    chosen, why = select(_Base(engine), "auto", "dense")
    assert chosen is engine and "Kronecker" in why
    chosen, why = select(_Base(None, "module 'x': no rule"), "auto")
    assert chosen is None and why == "autodiff: module 'x': no rule"
    with pytest.raises(InputError, match="module 'x': no rule"):
        select(_Base(None, "module 'x': no rule"), "structured")
    chosen, why = select(object(), "auto")
    assert chosen is None and "object is another matrix" in why


def test_custom_objective_gets_none_with_its_reason():
    class Custom(Objective):
        pass

    model, loss, data, _ = _ce()
    assert offer(Custom(model, loss, data))[1] == "the objective is a Custom (sharded or custom)"
    op = nh.HessianOperator(model, loss, data, _objective=Custom(model, loss, data))
    assert op.structured is None and "Custom (sharded or custom)" in op.structured_reason
    H = nh.hessian(model, loss, data, _objective=Custom(model, loss, data))
    assert H.engine == "autodiff" and "Custom" in H.engine_reason


def test_operator_builds_its_engine_once_and_anew_at_another_theta():
    model, loss, data, _ = _ce()
    op = nh.HessianOperator(model, loss, data)
    assert op.structured is op.structured and op.structured_reason == ""
    moved = op.at(op.objective.theta0 + 0.1)
    assert moved.structured is not op.structured and moved.structured.objective is moved.objective
    torch.testing.assert_close(moved.structured.dense(), moved.to_dense(), **TOL)


def test_chunks_and_memory_estimate():
    """Sample chunks do not change the numbers; the estimate refuses a budget one sample exceeds."""
    model, loss, data, _ = _ce()
    objective = Objective(model, loss, data)
    whole = StructuredEngine(objective)
    assert whole.chunk("dense") >= 9  # the whole batch in one chunk
    tiny = StructuredEngine(objective, work_bytes=1)
    assert tiny.chunk("dense") == 1 and tiny.work_estimate("dense", 2) > tiny.work_estimate("dense", 1) > 0
    torch.testing.assert_close(tiny.dense(), whole.dense(), **TOL)
    chosen, why = select(_Base(tiny), "auto", "dense")
    assert chosen is None and "working budget" in why


def test_checkpoint_takes_the_column_loop_or_is_refused():
    op = nh.HessianOperator(*_ce()[:3])
    chosen, why = select(op, "auto", "dense", checkpoint=object(), what="the dense Hessian")
    assert chosen is None and "checkpoint" in why
    with pytest.raises(InputError, match="the dense Hessian: engine='structured' .* takes no checkpoint"):
        select(op, "structured", "dense", checkpoint=object(), what="the dense Hessian")


def test_operator_names_the_first_unsupported_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)).to(D)
    op = nh.HessianOperator(model, nn.MSELoss(), (_x(5, 3), _x(5, 2, seed=3)))
    assert op.structured is None and "module '1'" in op.structured_reason and "PReLU" in op.structured_reason
    assert select(op, "auto", "dense") == (None, "autodiff: " + op.structured_reason)
    H = nh.hessian(model, nn.MSELoss(), (_x(5, 3), _x(5, 2, seed=3)))
    assert H.engine == "autodiff" and "PReLU" in H.engine_reason
