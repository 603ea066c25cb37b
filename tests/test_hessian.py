"""The dense Hessian and the operator against torch.autograd.functional.hessian (float64)."""

import pytest
import torch
from torch import nn

import nethessian as nh
from cases import CASES, reference_hessian
from helpers import assert_operator_matches

ids = list(CASES)


@pytest.fixture(params=ids, ids=ids)
def case(request):
    return CASES[request.param]()


def _names(model):
    return list(dict(model.named_parameters()))


def test_dense_matches_reference(case):
    model, loss_fn, data = case
    H = nh.hessian(model, loss_fn, data)
    R = reference_hessian(model, loss_fn, data)
    assert H.names == tuple(_names(model))
    torch.testing.assert_close(H.dense, R, rtol=1e-10, atol=1e-12 * float(R.abs().max()))


@pytest.mark.parametrize(
    "method,cache", [("auto", "auto"), ("auto", False), ("double-backward", False), ("double-backward", True)]
)
def test_operator_matches_reference(case, method, cache):
    model, loss_fn, data = case
    op = nh.HessianOperator(model, loss_fn, data, method=method, cache=cache)
    assert_operator_matches(op, reference_hessian(model, loss_fn, data))


def test_forward_over_reverse_explicit(case):
    model, loss_fn, data = case
    op = nh.HessianOperator(model, loss_fn, data, method="forward-over-reverse")
    try:
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    except RuntimeError as exc:  # torch 2.13: jvp(grad(mse_loss(mean))) hits an immutable ZeroTensor
        assert "ZeroTensor" in str(exc)
        pytest.skip(f"torch has no forward-over-reverse for this loss: {exc}")
    assert op.method == "forward-over-reverse"
    assert_operator_matches(op, reference_hessian(model, loss_fn, data))


def test_auto_falls_back_to_double_backward_and_says_why():
    model, loss_fn, data = CASES["mlp_tanh_mse"]()  # MSELoss(mean): no forward-AD rule in torch 2.13
    op = nh.HessianOperator(model, loss_fn, data, cache=False)
    assert_operator_matches(op, reference_hessian(model, loss_fn, data))
    assert op.method in ("forward-over-reverse", "double-backward")
    assert (op.fallback_reason is None) == (op.method == "forward-over-reverse")


def test_blocks_natural_shape_and_by_module():
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    H = nh.hessian(model, loss_fn, data)
    w, b = model[0].weight, model[0].bias
    assert H["0.weight", "0.bias"].shape == (w.numel(), b.numel())
    assert H.block("0.weight", "0.bias").shape == w.shape + b.shape
    torch.testing.assert_close(H.block("0.weight", "0.bias").reshape(w.numel(), -1), H["0.weight", "0.bias"])
    torch.testing.assert_close(H["2.bias"], H["2.bias", "2.bias"])
    M = H.by_module()
    assert M.names == ("0", "2")
    n0 = w.numel() + b.numel()
    torch.testing.assert_close(M["0", "2"], H.dense[:n0, n0:])
    torch.testing.assert_close(M.eigvalsh(), H.eigvalsh())


def test_by_module_regroups_non_contiguous():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double()
    X, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    H = nh.hessian(model, nn.MSELoss(), (X, y), params=["1.bias", "0.weight", "0.bias"])
    assert H.names == ("0.weight", "0.bias", "1.bias")  # model order, whatever the request order
    M = H.by_module()
    torch.testing.assert_close(M["1"], H["1.bias"])


@pytest.mark.parametrize("pattern", [["0.*"], ["*.bias"], ["2.weight", "0.bias"]])
def test_subset_equals_blocks_of_full(pattern):
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    full = nh.hessian(model, loss_fn, data)
    sub = nh.hessian(model, loss_fn, data, params=pattern)
    for r in sub.names:
        for c in sub.names:
            torch.testing.assert_close(sub[r, c], full[r, c], rtol=1e-12, atol=1e-14)


def test_unused_parameter_gives_zero_blocks():
    model, loss_fn, data = CASES["unused_mse"]()
    H = nh.hessian(model, loss_fn, data)
    assert torch.count_nonzero(H["unused", "unused"]) == 0
    assert torch.count_nonzero(H["unused", "fc.weight"]) == 0


def test_linear_cost_has_zero_hessian():
    model = nn.Linear(3, 1).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    op = nh.HessianOperator(model, lambda out, y: (out * y).sum(), (X, torch.ones(4, 1, dtype=torch.float64)))
    assert torch.count_nonzero(op.to_dense()) == 0


def test_float32_close_to_float64():
    model, loss_fn, (X, y) = CASES["mlp_softplus_ce"]()
    R = reference_hessian(model, loss_fn, (X, y))
    H32 = nh.hessian(model.float(), loss_fn, (X.float(), y))
    assert H32.dense.dtype == torch.float32
    torch.testing.assert_close(H32.dense.double(), R, rtol=1e-4, atol=1e-5 * float(R.abs().max()))


def test_operator_does_not_touch_model():
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = nh.HessianOperator(model, loss_fn, data)
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_eigvalsh_matches_dense():
    model, loss_fn, data = CASES["two_layer"]()
    H = nh.hessian(model, loss_fn, data)
    torch.testing.assert_close(H.eigvalsh(), torch.linalg.eigvalsh(reference_hessian(model, loss_fn, data)))


def test_matrix_product_chunks_equal_single_columns():
    model, loss_fn, data = CASES["cnn_ce"]()
    op = nh.HessianOperator(model, loss_fn, data, chunk_size=3)
    V = torch.randn(op.shape[0], 7, dtype=torch.float64)
    HV = op @ V
    for j in range(7):
        torch.testing.assert_close(HV[:, j], op @ V[:, j], rtol=1e-10, atol=1e-12)


def test_under_no_grad_nothing_changes():
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    R = reference_hessian(model, loss_fn, data)
    with torch.no_grad():
        op = nh.HessianOperator(model, loss_fn, data)
        torch.testing.assert_close(op.to_dense(), R, rtol=1e-10, atol=1e-13)
        g = nh.Objective(model, loss_fn, data).gradient()
    torch.testing.assert_close(op.to_dense(), R, rtol=1e-10, atol=1e-13)
    assert float(g.norm()) > 0


@pytest.mark.parametrize("cache", [True, False])
def test_operator_is_a_snapshot(cache):
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    op = nh.HessianOperator(model, loss_fn, data, params=["0.*"], cache=cache)
    v = torch.ones(op.shape[0], dtype=torch.float64)
    before = op @ v
    with torch.no_grad():  # the user keeps training: the operator stays at θ0
        for p in model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(op @ v, before, rtol=0, atol=0)
