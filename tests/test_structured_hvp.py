"""The structured Hessian-vector engine (``structured._hvp``): second-order forward and backward passes.

A ``HessianOperator`` on an ``nn.Sequential`` of ``nn.Linear`` and activation modules with a loss
that is a sum over samples runs its products through the R-operator on kept per-batch quantities
(``op.engine == "structured"``). Checked in float64 against ``torch.autograd.functional.hessian``
of a hand-written J(θ) (one batch) and against the kept autograd graph (many batches, subsets,
weights, ignored targets, blocks); and the engine is offered only where it applies, and a product
that disagrees with the exact route at construction is refused in favour of the kept graph.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nethessian as nh
from nethessian.structured import _hvp

from cases import reference_hessian

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)

ACTIVATIONS = [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.GELU, nn.Softplus, nn.SiLU, nn.ELU, nn.LeakyReLU]


def _net(act, bias=True, widths=(5, 7, 4, 3)):
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def _data(n=24, d=5, out=3, classes=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, out, (n,), generator=g) if classes else torch.randn(n, out, generator=g, dtype=DT)
    return X, y


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
@pytest.mark.parametrize(
    "loss",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1), nn.MSELoss()],
    ids=["ce", "ce-sum-smoothing", "mse"],
)
def test_dense_hessian_equals_autograd_functional_hessian(act, loss):
    model = _net(act)
    data = _data(classes=not isinstance(loss, nn.MSELoss))
    op = nh.HessianOperator(model, loss, data)
    assert op.engine == "structured" and op.method == "structured"
    H = op.to_dense()
    torch.testing.assert_close(H, reference_hessian(model, loss, data), **TOL)


def _kept(model, loss, data, **kw):
    return nh.HessianOperator(model, loss, data, method="double-backward", **kw)


@pytest.mark.parametrize(
    "params",
    [None, ["0.weight"], ["0.bias"], ["2.weight", "4.bias"], ["4.weight"]],
    ids=["all", "first-weight", "first-bias", "middle-and-last", "last"],
)
def test_parameter_subsets_match_the_kept_graph(params, monkeypatch):
    """Also: every entry of a product is written (its memory is not zero-filled; here it starts as NaN)."""
    model, data = _net(nn.Tanh), _data()
    op, ref = nh.HessianOperator(model, nn.CrossEntropyLoss(), data, params=params), None
    ref = _kept(model, nn.CrossEntropyLoss(), data, params=params)
    assert op.engine == "structured" and ref.engine == "kept-graph"
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: empty_like(x, **kw).fill_(float("nan")))
    V = torch.randn(op.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op @ V, ref @ V, **TOL)
    torch.testing.assert_close(op @ V[:, 1], ref @ V[:, 1], **TOL)


def test_ragged_batches_weights_ignored_targets_and_an_all_ignored_batch():
    """Batch weights and term counts come from the objective, as for every engine."""
    model = _net(nn.Sigmoid, bias=False)
    X, y = _data(n=30)
    y = y.clone()
    y[:4] = 1  # ignored below
    y[10:13] = 1  # the whole third batch
    batches = [(X[:10], y[:10]), (X[10:13], y[10:13]), (X[13:], y[13:])]
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT), ignore_index=1)
    op, ref = nh.HessianOperator(model, loss, batches), _kept(model, loss, batches)
    assert op.engine == "structured"
    torch.testing.assert_close(op.to_dense(), ref.to_dense(), **TOL)


def test_bce_with_logits_and_a_sum_of_squares():
    model = _net(nn.Tanh, widths=(5, 6, 2))
    X, _ = _data()
    t = (torch.rand(X.shape[0], 2, generator=torch.Generator().manual_seed(3)) > 0.5).to(DT)
    for loss in (nn.BCEWithLogitsLoss(), nn.MSELoss(reduction="sum")):
        op = nh.HessianOperator(model, loss, (X, t))
        assert op.engine == "structured"
        torch.testing.assert_close(op.to_dense(), reference_hessian(model, loss, (X, t)), **TOL)


def test_float32_products_agree_with_the_kept_graph_to_rounding():
    model = _net(nn.Tanh).float()
    X, y = _data()
    op, ref = nh.HessianOperator(model, nn.CrossEntropyLoss(), (X.float(), y)), None
    ref = _kept(model, nn.CrossEntropyLoss(), (X.float(), y))
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(4))
    a, b = op @ v, ref @ v
    assert op.engine == "structured"
    assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(DT), "nn.Linear and activation"),
        (lambda: nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3)).to(DT).eval(), "nn.Linear and act"),
        (lambda: nn.Linear(5, 3).to(DT), "nn.Sequential"),
    ],
    ids=["layernorm", "dropout", "not-sequential"],
)
def test_other_models_keep_the_autograd_engines(make, why):
    model, data = make(), _data()
    chain, reason = _hvp.offer_hvp(nh.HessianOperator(model, nn.CrossEntropyLoss(), data).objective)
    assert chain is None and why in reason
    assert nh.HessianOperator(model, nn.CrossEntropyLoss(), data).engine == "kept-graph"


def test_streamed_data_and_explicit_methods_keep_their_engines():
    model, (X, y) = _net(nn.Tanh), _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    assert nh.HessianOperator(model, nn.CrossEntropyLoss(), loader).engine == "forward-over-reverse"
    assert _kept(model, nn.CrossEntropyLoss(), (X, y)).engine == "kept-graph"
    assert nh.HessianOperator(model, nn.CrossEntropyLoss(), (X, y), cache=False).engine == "forward-over-reverse"


def test_a_wrong_product_is_refused_at_construction(monkeypatch):
    """The engine is cross-checked against jvp(grad) like the kept graph: a wrong one never runs."""
    run = _hvp.ChainHVP.run
    monkeypatch.setattr(_hvp.ChainHVP, "run", lambda self, V: 1.01 * run(self, V))
    op = nh.HessianOperator(_net(nn.Tanh), nn.CrossEntropyLoss(), _data())
    assert op.engine == "kept-graph" and "second-order backprop" in op.fallback_reason


def test_many_outputs_per_sample_keep_the_kept_graph():
    """The loss's per-sample Hessian is N·D² entries: above MAX_OUTPUTS the kept graph serves, decided
    from the layers before any loss Hessian is formed."""
    D = _hvp.MAX_OUTPUTS + 1
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, D)).to(DT)
    X = torch.randn(6, 4, dtype=DT)
    y = torch.randint(0, D, (6,), generator=torch.Generator().manual_seed(0))
    chain, reason = _hvp.offer_hvp(nh.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)).objective)
    assert chain is None and f"{D} outputs per sample" in reason
    assert nh.HessianOperator(model, nn.CrossEntropyLoss(), (X, y)).engine == "kept-graph"


def test_inputs_with_a_sequence_axis():
    """``nn.Linear`` acts on the last axis: (N, T, features) inputs, per-sample outputs T·out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    X = torch.randn(5, 6, 3, dtype=DT)
    Y = torch.randn(5, 6, 2, dtype=DT)
    op = nh.HessianOperator(model, nn.MSELoss(), (X, Y))
    assert op.engine == "structured"
    torch.testing.assert_close(op.to_dense(), reference_hessian(model, nn.MSELoss(), (X, Y)), **TOL)
    sub = nh.HessianOperator(model, nn.MSELoss(), (X, Y), params=["0.weight"])
    torch.testing.assert_close(sub.to_dense(), reference_hessian(model, nn.MSELoss(), (X, Y), ["0.weight"]), **TOL)
