"""nh.check on badly scaled models: no false alarm on correct Hessians, still fails on wrong ones.

Before the step per direction and Richardson extrapolation, 12 of the 18 correct runs below
(every badly scaled case, float32 and float64) were reported FAILED.
"""

import pytest
import torch

from nethessian._check import KAPPA, check
from nethessian._dense import BlockHessian
from nethessian._finite_differences import fd_hessian, fd_hessian_with_errors
from nethessian._objective import Objective
from nethessian.errors import InputError

from cases import reference_hessian
from check_scaling_cases import CORRECT, DTYPES, WRONG

BADLY_SCALED = [
    "inputs_times_1e3",
    "inputs_times_1e3_tanh",
    "bias_at_1000",
    "output_bias_at_1000",
    "logspace_features",
    "logspace_features_logistic",
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CORRECT.keys())
def test_no_false_alarm_on_correct_models(case, dtype):
    model, loss_fn, data = CORRECT[case](dtype)
    rep = check(model, loss_fn, data)
    assert rep.passed, str(rep)
    assert next(model.parameters()).dtype == dtype  # the user's model untouched
    assert rep.block_details and rep.hvp_detail is not None


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", WRONG.keys())
def test_wrong_double_backward_fails_and_says_by_how_much(case, dtype):
    rep = check(*WRONG[case](dtype))
    assert not rep.passed
    assert not rep.hvp_detail.passed and rep.hvp_vs_fd > 1e3 * rep.hvp_detail.tolerance
    failed = [k for k, c in rep.block_details.items() if not c.passed]
    assert failed and all(rep.blocks_vs_fd[k] > 0.1 for k in failed)
    text = str(rep)
    assert "FAILED:" in text and "× the tolerance" in text and "allowed" in text
    d = rep.to_dict()
    assert d["passed"] is False and d["hvp_detail"]["passed"] is False


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_wrong_double_backward_fails_on_products_alone(dtype):
    """P above dense_max_params: the product check alone must find it."""
    rep = check(*WRONG["once_differentiable_cube"](dtype), dense_max_params=0)
    assert not rep.passed and rep.blocks_vs_fd is None and rep.hvp_vs_fd > 0.1


@pytest.mark.parametrize("case", ["bias_at_1000", "inputs_times_1e3", "logspace_features"])
def test_small_error_still_found_on_badly_scaled_models(case, monkeypatch):
    """The error model widens the tolerance only as far as finite differences are inaccurate:
    a Hessian 1e-4 too large is still FAILED on the badly scaled models."""
    from nethessian.operators._hessian import HessianOperator

    matmul, dense = HessianOperator.__matmul__, HessianOperator.to_dense
    monkeypatch.setattr(HessianOperator, "__matmul__", lambda self, v: (1 + 1e-4) * matmul(self, v))
    monkeypatch.setattr(HessianOperator, "to_dense", lambda self, **kw: (1 + 1e-4) * dense(self, **kw))
    rep = check(*CORRECT[case](torch.float64))
    assert not rep.passed and not rep.hvp_detail.passed
    assert 5e-5 < rep.hvp_vs_fd < 2e-4
    assert rep.dense_vs_columns < 1e-12  # the same wrong Hessian both ways
    big = [k for k, c in rep.block_details.items() if c.estimate < 1e-6]  # blocks resolved to 1e-6
    assert big and all(not rep.block_details[k].passed for k in big)


def _fd_and_exact(case):
    model, loss_fn, data = CORRECT[case](torch.float64)
    obj = Objective(model, loss_fn, data)
    F, E, steps = fd_hessian_with_errors(lambda t: obj.gradient(t).double(), obj.theta0)
    return obj, F, E, steps, reference_hessian(model, loss_fn, data)


@pytest.mark.parametrize("case", CORRECT.keys())
def test_fd_hessian_is_accurate_and_its_error_estimate_bounds_the_error(case):
    """Against float64 torch.autograd.functional.hessian: every block's error is within κ × its
    estimate, and the whole finite-difference Hessian is accurate to 1e-7 of its largest entry
    (one step for all directions gave up to 1e-4 on the badly scaled cases)."""
    obj, F, E, _, H = _fd_and_exact(case)
    scale = float(H.abs().max())
    assert float((F - H).abs().max()) <= 1e-7 * scale
    Fb, Eb, Hb = (BlockHessian(M, obj.layout) for M in (F, E, H))
    for r in obj.layout.names:
        for c in obj.layout.names:
            assert float((Fb[r, c] - Hb[r, c]).abs().max()) <= KAPPA * float(Eb[r, c].max()) + 1e-300
    assert float(E.max()) <= 1e-6 * scale  # the estimate is not vacuous


def test_steps_follow_each_direction():
    """A saturated bias at 1000 gets a larger step; a weight on features ×1e3 a smaller one."""
    obj, _, _, steps, _ = _fd_and_exact("bias_at_1000")
    bias = obj.layout.slice("0.bias")
    assert float(steps[bias][0]) > 1e3 * float(steps.min())  # the bias at 1000
    w = steps[obj.layout.slice("0.weight")].reshape(5, 4)
    assert float(w[1:].max()) < 1e-4  # the weights of the working units keep small steps
    obj, _, _, steps, _ = _fd_and_exact("inputs_times_1e3")
    assert float(steps[obj.layout.slice("0.weight")].min()) < torch.finfo(torch.float64).eps ** (1 / 3)


def test_fd_hessian_keeps_its_signature():
    model, loss_fn, data = CORRECT["two_layer"](torch.float64)
    obj = Objective(model, loss_fn, data)
    H = reference_hessian(model, loss_fn, data)
    for eps in (None, 1e-4):
        F = fd_hessian(obj, eps) if eps else fd_hessian(obj)
        assert float((F - H).abs().max()) <= 1e-8 * float(H.abs().max())
        assert torch.equal(F, F.T)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_vectors": 2.7},
        {"num_vectors": 0},
        {"seed": "abc"},
        {"tolerance": "1e-3"},
        {"tolerance": 0.0},
        {"tolerance": 2.0},
        {"dense_max_params": -1},
    ],
)
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(InputError):
        check(*CORRECT["two_layer"](torch.float64), **kwargs)


def test_directional_derivative_on_a_closed_form():
    """f(θ) = Σ cos(a_j θ_j) + ½ θᵀAθ: H = A − diag(a² cos(aθ)), with a = logspace(-3, 3) and one
    θ_j at 1000; every column within κ × its estimate, and to 1e-7 of the column's scale."""
    from nethessian._finite_differences import directional_derivative, fd_steps

    g = torch.Generator().manual_seed(0)
    a = torch.logspace(-3, 3, 7, dtype=torch.float64)
    B = torch.randn(7, 7, generator=g, dtype=torch.float64)
    A = B @ B.T
    theta = torch.randn(7, generator=g, dtype=torch.float64)
    theta[3] = 1000.0

    def grad(t):
        return -a * torch.sin(a * t) + A @ t

    H = A - torch.diag(a**2 * torch.cos(a * theta))
    for j, h in enumerate(fd_steps(theta)):
        col = directional_derivative(grad, theta, torch.eye(7, dtype=torch.float64)[j], float(h))
        exact = H @ col.direction
        err = float((col.value - exact).abs().max())
        assert err <= KAPPA * float(col.error.max())
        assert err <= 1e-7 * float(exact.abs().max())


def test_a_non_finite_gradient_is_a_clear_error():
    from nethessian._finite_differences import directional_derivative
    from nethessian.errors import NetHessianError

    with pytest.raises(NetHessianError, match="not finite"):
        directional_derivative(
            lambda t: t / 0.0, torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 1e-5
        )


def test_unresolved_block_is_said_so():
    rep = check(*CORRECT["inputs_times_1e3_tanh"](torch.float64))
    assert rep.passed
    assert "not resolved" in str(rep)  # saturated units: finite differences see only noise
