"""The structured engine (second-order backpropagation) against autodiff, in float64.

Every case of ``structured_cases.CASES``: the exact diagonal (``nh.diagonal``), the
exact trace, each layer's dense block and the full dense Hessian with cross-layer
blocks (``nh.hessian``) equal the autodiff results (Hessian-vector products of the
kept gradient graph, an independent path). Plus: the two-layer network's a, b, c
blocks equal the closed forms of docs/two-layer-hessian.md, one case against
``torch.autograd.functional.hessian`` of a hand-written J(θ), engine selection and
its stated reasons, and the memory refusals.
"""

from __future__ import annotations

import pytest
import torch

import nethessian as nh
from nethessian.errors import InputError
from nethessian.structured import StructuredEngine, select

from structured_cases import CASES, UNSUPPORTED

TOL = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module", params=sorted(CASES), ids=sorted(CASES))
def case(request):
    model, loss, data = CASES[request.param]()
    reference = nh.hessian(model, loss, data, engine="autodiff")
    assert reference.engine == "autodiff"
    return model, loss, data, reference


def test_dense_matches_autodiff(case):
    model, loss, data, ref = case
    H = nh.hessian(model, loss, data, engine="structured")
    assert H.engine == "structured"
    torch.testing.assert_close(H.dense, ref.dense, **TOL)


def test_diagonal_and_trace_match_autodiff(case):
    model, loss, data, ref = case
    op = nh.HessianOperator(model, loss, data)
    d = nh.diagonal(op, method="exact", engine="structured")
    assert (d.engine, d.num_matvecs) == ("structured", 0)
    torch.testing.assert_close(d.values, ref.dense.diagonal(), **TOL)
    t = nh.trace(op, exact=True, engine="structured", by_block=True)
    assert t.engine == "structured"
    assert abs(t.value - float(ref.dense.trace())) <= 1e-9 * max(1.0, abs(float(ref.dense.trace())))
    for name, est in t.blocks.items():
        assert est.value == pytest.approx(float(ref[name].trace()), rel=1e-9, abs=1e-11)


def test_layer_blocks_match_autodiff(case):
    model, loss, data, ref = case
    engine = StructuredEngine(nh.HessianOperator(model, loss, data).objective)
    blocks = engine.blocks()
    assert blocks, "every case has parameterised layers"
    for names, block in blocks.items():
        idx = ref.layout.indices(list(names))
        torch.testing.assert_close(block, ref.dense[idx][:, idx], **TOL)


def test_against_autograd_functional_hessian():
    """A hand-written J(θ) of the flat parameters: an independent reference."""
    model, loss, (X, y) = CASES["ce-weights-ignore-smoothing"]()
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def J(t):
        W1, b1, W2, b2 = torch.split(t, [s.numel() for s in shapes])
        h = torch.tanh(X @ W1.reshape(shapes[0]).T + b1)
        return loss(h @ W2.reshape(shapes[2]).T + b2, y)

    ref = torch.autograd.functional.hessian(J, theta)
    torch.testing.assert_close(nh.hessian(model, loss, (X, y), engine="structured").dense, ref, **TOL)


def test_two_layer_blocks_equal_closed_forms():
    """a = ∂²J/∂W1², b = ∂²J/∂W1∂W2, c = ∂²J/∂W2² from the δ recursion of the docs page."""
    model, loss, (X, y) = nh.examples.two_layer(seed=3)
    H = nh.hessian(model, loss, (X, y), engine="structured")
    W1, W2 = model.W1.detach(), model.W2.detach()
    z2 = X @ W1
    a2 = torch.sigmoid(z2)
    yhat = torch.sigmoid(a2 @ W2)
    s3 = yhat * (1 - yhat)  # f'(z3)
    d3 = -(y - yhat) * s3  # δ3 = ∂J/∂z3 per sample
    s2, f2 = a2 * (1 - a2), a2 * (1 - a2) * (1 - 2 * a2)  # f'(z2), f''(z2)
    Hz3 = s3**2 + (-(y - yhat)) * s3 * (1 - 2 * yhat)  # ∂²J/∂z3² per sample
    c = torch.einsum("n,ni,nj->ij", Hz3[:, 0], a2, a2)
    Hz2 = torch.einsum("n,i,j,ni,nj->nij", Hz3[:, 0], W2[:, 0], W2[:, 0], s2, s2) + torch.diag_embed(d3 * W2[:, 0] * f2)
    a = torch.einsum("nij,nk,nl->kilj", Hz2, X, X).reshape(6, 6)
    b = torch.einsum("n,nk,i,ni,nj->kij", Hz3[:, 0], X, W2[:, 0], s2, a2).reshape(6, 3) + torch.einsum(
        "n,nk,ni,ij->kij", d3[:, 0], X, s2, torch.eye(3, dtype=X.dtype)
    ).reshape(6, 3)
    torch.testing.assert_close(H["W1", "W1"], a, **TOL)
    torch.testing.assert_close(H["W1", "W2"], b, **TOL)
    torch.testing.assert_close(H["W2", "W2"], c, **TOL)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_falls_back_with_reason(name):
    build, words = UNSUPPORTED[name]
    model, loss, data = build()
    op = nh.HessianOperator(model, loss, data, allow_random=False)
    d = nh.diagonal(op, method="exact")
    assert d.engine == "autodiff" and words in d.engine_reason
    with pytest.raises(InputError, match="engine='structured' cannot run"):
        nh.diagonal(op, method="exact", engine="structured")
    H = nh.hessian(model, loss, data)
    assert H.engine == "autodiff" and words in H.engine_reason
    torch.testing.assert_close(d.values, H.dense.diagonal(), **TOL)


def test_engine_choice_is_validated_and_explained():
    model, loss, data = CASES["ce-mean"]()
    op = nh.HessianOperator(model, loss, data)
    with pytest.raises(InputError, match="unknown engine"):
        nh.diagonal(op, engine="fast")
    with pytest.raises(InputError, match="method='exact' only"):
        nh.diagonal(op, method="estimate", engine="structured")
    assert nh.diagonal(op, engine="autodiff").engine_reason.startswith("autodiff: engine='autodiff'")
    assert select(op, "auto")[0] is not None
    ggn = nh.GGNOperator(model, loss, data)
    chosen, why = select(ggn, "auto")
    assert chosen is None and "GGNOperator" in why
    plain = torch.eye(3, dtype=torch.float64)
    assert nh.diagonal(plain).engine == "autodiff"
    with pytest.raises(InputError, match="another matrix"):
        nh.diagonal(plain, engine="structured")


def test_memory_is_estimated_before_allocation():
    """Per-sample matrices above the budget: auto falls back, structured refuses, dense checks max_bytes."""
    model, loss, data = nh.examples.cnn(n=2, dtype=torch.float64)
    op = nh.HessianOperator(model, loss, data)
    engine = StructuredEngine(op.objective)
    assert engine.work_estimate("blocks", 1) > engine.work_bytes
    with pytest.raises(InputError, match="GiB"):
        nh.hessian(model, loss, data, engine="structured")
    small, sl, sd = CASES["ce-mean"]()
    with pytest.raises(nh.errors.DenseTooLargeError):
        nh.hessian(small, sl, sd, engine="structured", max_bytes=100)


def test_cnn_diagonal_uses_factors_that_stay_few_with_relu():
    """The small CNN's diagonal runs on K = 10 factors (ReLU adds none): MiB per sample, not GiB.

    Before the factor path the dense frontier needed ~3.5 GiB per sample; a ReLU whose
    exactly-zero residual was kept as a diagonal would add one factor per unit (GiB again).
    """
    model, loss, data = nh.examples.cnn(n=2, dtype=torch.float64)
    engine = StructuredEngine(nh.HessianOperator(model, loss, data).objective)
    assert engine.chain and engine.work_estimate("diagonal", 1) < 4 * 2**20
    assert select(nh.HessianOperator(model, loss, data), "auto")[0] is not None


@pytest.mark.parametrize("name", ["residual-fx", "layernorm", "two-branch-fx"])
def test_branching_and_smooth_graphs_keep_the_dense_frontier(name):
    """Non-chain graphs and dense residuals take the joint-frontier path (still exact)."""
    model, loss, data = CASES[name]()
    assert not StructuredEngine(nh.HessianOperator(model, loss, data).objective).chain


def test_auto_dense_keeps_autodiff_and_says_why():
    """A chosen parameter outside a dense layer (LayerNorm's): the slower generic path is not
    taken by "auto", and the reason says so; a chain of Linear layers goes structured."""
    model, loss, data = CASES["layernorm"]()
    H = nh.hessian(model, loss, data)
    assert H.engine == "autodiff" and "slower" in H.engine_reason
    model, loss, data = CASES["ce-mean"]()
    H = nh.hessian(model, loss, data)
    assert H.engine == "structured" and "Kronecker" in H.engine_reason


def test_chunks_of_samples_give_the_same_result():
    """The sample chunking (memory budget) does not change the numbers."""
    model, loss, data = CASES["residual-fx"]()
    objective = nh.HessianOperator(model, loss, data).objective
    whole = StructuredEngine(objective).dense()
    tiny = StructuredEngine(objective, work_bytes=1)
    assert tiny.chunk("dense") == 1
    torch.testing.assert_close(tiny.dense(), whole, **TOL)
