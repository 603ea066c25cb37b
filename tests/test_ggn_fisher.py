"""GGN, Fisher and empirical Fisher against independent references (float64).

References are built from explicit Jacobians (torch.autograd.functional.jacobian
of the outputs w.r.t. a flat θ), explicit loss Hessians w.r.t. the outputs
(torch.autograd.functional.hessian) and per-sample gradients from a loop.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from cases import CASES, DT, reference_hessian
from helpers import assert_operator_matches
from nethessian.errors import InputError
from nethessian._objective import math_attention
from nethessian.operators._fisher import EmpiricalFisherOperator, FisherOperator
from nethessian.operators._ggn import GGNOperator

ids = list(CASES)


def _flat(model):
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(t, X):
        parts = dict(zip(names, (p.reshape(s) for p, s in zip(torch.split(t, sizes), shapes))))
        with math_attention():
            return torch.func.functional_call(model, parts, (X,))

    return theta, f


def reference_ggn(model, loss_fn, data):
    """Jᵀ H_ℓ J from the explicit output Jacobian and the explicit loss Hessian (one batch)."""
    X, y = data
    theta, f = _flat(model)
    Jac = torch.autograd.functional.jacobian(lambda t: f(t, X), theta)
    out = f(theta, X).detach()
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out)
    J2, H2 = Jac.reshape(out.numel(), -1), H.reshape(out.numel(), out.numel())
    return J2.T @ H2 @ J2


def reference_ef(model, loss_fn, data, scale):
    """scale · Σ_n ∇ℓ_n ∇ℓ_nᵀ, ℓ_n = sample n's summed loss, gradients one sample at a time."""
    X, y = data
    theta, f = _flat(model)
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    grads = [
        torch.autograd.grad(summed(f(t, X[n : n + 1]), y[n : n + 1]), t)[0]
        for n in range(X.shape[0])
        for t in [theta.clone().requires_grad_(True)]
    ]
    G = torch.stack(grads)
    return scale * G.T @ G


def _ce_ignore():
    model, _, (X, y) = CASES["mlp_softplus_ce"]()
    y = y % 2
    y[[1, 4, 5, 9]] = 2  # class 2 ignored: 8 of 12 targets count
    return model, nn.CrossEntropyLoss(ignore_index=2), (X, y)


def _bce():
    model, _, (X, _) = CASES["mlp_tanh_mse"]()
    y = torch.rand(12, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    return model, nn.BCEWithLogitsLoss(), (X, y)


# -- GGN ---------------------------------------------------------------------------------
CONFIGS = [
    dict(),
    dict(method="forward", cache=False, loss_hessian="autograd"),
    dict(method="reverse", cache=True),
    dict(method="reverse", cache=False, loss_hessian="autograd"),
]


@pytest.mark.parametrize("name", ids)
def test_ggn_matches_explicit_jacobians(name):
    model, loss_fn, data = CASES[name]()
    assert_operator_matches(GGNOperator(model, loss_fn, data), reference_ggn(model, loss_fn, data))


@pytest.mark.parametrize("config", CONFIGS[1:], ids=["fwd-autograd", "rev-kept", "rev-autograd"])
@pytest.mark.parametrize("name", ["two_layer", "mlp_tanh_mse", "mlp_sigmoid_ce_sum", "cnn_ce", "tied_ce"])
def test_ggn_engines_match_explicit_jacobians(name, config):
    model, loss_fn, data = CASES[name]()
    assert_operator_matches(GGNOperator(model, loss_fn, data, **config), reference_ggn(model, loss_fn, data))


def _ce_smoothing():
    model, _, data = _ce_ignore()
    return model, nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.2), data


@pytest.mark.parametrize("make", [_ce_ignore, _bce, _ce_smoothing], ids=["ce-ignore", "bce", "ce-smoothing"])
def test_ggn_closed_forms_match_explicit(make):
    model, loss_fn, data = make()
    R = reference_ggn(model, loss_fn, data)
    assert_operator_matches(GGNOperator(model, loss_fn, data), R)
    assert_operator_matches(GGNOperator(model, loss_fn, data, loss_hessian="autograd"), R)


@pytest.mark.parametrize("name", ids)
def test_ggn_is_psd_for_convex_losses(name):
    model, loss_fn, data = CASES[name]()
    G = GGNOperator(model, loss_fn, data).to_dense()
    scale = float(G.abs().max())
    assert float(torch.linalg.eigvalsh(G).min()) >= -1e-12 * scale


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.CrossEntropyLoss(reduction="sum")], ids=["mse", "ce"])
def test_ggn_equals_hessian_for_linear_model(loss_fn):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 4, generator=g, dtype=DT)
    y = (
        torch.randint(0, 3, (10,), generator=g)
        if isinstance(loss_fn, nn.CrossEntropyLoss)
        else torch.randn(10, 3, generator=g, dtype=DT)
    )
    assert_operator_matches(GGNOperator(model, loss_fn, (X, y)), reference_hessian(model, loss_fn, (X, y)))


def test_ggn_differs_from_hessian_for_a_network():
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    G, H = GGNOperator(model, loss_fn, data).to_dense(), reference_hessian(model, loss_fn, data)
    assert float((G - H).abs().max()) > 1e-3 * float(H.abs().max())


# -- Fisher --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        CASES["mlp_softplus_ce"],
        CASES["mlp_sigmoid_ce_sum"],
        CASES["cnn_ce"],
        CASES["mlp_tanh_mse"],
        CASES["layernorm_mse"],
        _ce_ignore,
        _bce,
    ],
    ids=["ce-mean", "ce-sum", "cnn-ce", "mse-mean", "mse-sum", "ce-ignore", "bce"],
)
def test_exact_fisher_equals_ggn(make):
    model, loss_fn, data = make()
    assert_operator_matches(FisherOperator(model, loss_fn, data), reference_ggn(model, loss_fn, data))


def _rms_errors(make, ms, seeds=range(6)):
    model, loss_fn, data = make()
    F = FisherOperator(model, loss_fn, data).to_dense()
    errs = []
    for m in ms:
        sq = [
            float(
                torch.linalg.norm(FisherOperator(model, loss_fn, data, mc_samples=m, seed=s).to_dense() - F)
                / torch.linalg.norm(F)
            )
            ** 2
            for s in seeds
        ]
        errs.append(math.sqrt(sum(sq) / len(sq)))
    return errs


@pytest.mark.parametrize(
    "make", [CASES["mlp_softplus_ce"], CASES["mlp_tanh_mse"], _ce_ignore, _bce], ids=["ce", "mse", "ce-ignore", "bce"]
)
def test_mc_fisher_converges_like_one_over_sqrt_m(make):
    ms = (4, 64, 1024)
    errs = _rms_errors(make, ms)
    assert errs[0] > errs[1] > errs[2]
    slope = math.log(errs[2] / errs[0]) / math.log(ms[2] / ms[0])  # 1/√m: slope −½
    assert -0.75 < slope < -0.3, (errs, slope)
    assert errs[2] < 0.1


def test_mc_fisher_is_seeded_fixed_symmetric_psd():
    model, loss_fn, data = CASES["cnn_ce"]()
    a = FisherOperator(model, loss_fn, data, mc_samples=3, seed=7)
    D = a.to_dense()
    torch.testing.assert_close(D, FisherOperator(model, loss_fn, data, mc_samples=3, seed=7).to_dense())
    assert not torch.allclose(D, FisherOperator(model, loss_fn, data, mc_samples=3, seed=8).to_dense())
    assert_operator_matches(a, D)  # the same labels for every product: one fixed matrix
    assert float(torch.linalg.eigvalsh(D).min()) >= -1e-12 * float(D.abs().max())


# -- empirical Fisher ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,scale",
    [
        (CASES["mlp_softplus_ce"], 1 / 12),
        (CASES["mlp_sigmoid_ce_sum"], 1.0),
        (CASES["cnn_ce"], 1 / 6),
        (CASES["mlp_tanh_mse"], 1 / 36),
        (CASES["layernorm_mse"], 1.0),
        (CASES["two_layer"], 1.0),
        (_ce_ignore, 1 / 8),
        (_bce, 1 / 36),
    ],
    ids=["ce-mean", "ce-sum", "cnn", "mse-mean", "mse-sum", "custom-sum", "ce-ignore", "bce"],
)
def test_empirical_fisher_is_sum_of_per_sample_outer_products(make, scale):
    model, loss_fn, data = make()
    ref = reference_ef(model, loss_fn, data, scale)
    for method in ("forward", "reverse"):
        assert_operator_matches(EmpiricalFisherOperator(model, loss_fn, data, method=method), ref)


# -- batches ----------------------------------------------------------------------------------
def _split(data, sizes=(5, 4, 3)):
    X, y = data
    return [(x, t) for x, t in zip(X.split(list(sizes)), y.split(list(sizes)))]


@pytest.mark.parametrize(
    "make",
    [_ce_ignore, CASES["mlp_tanh_mse"], _bce, CASES["mlp_sigmoid_ce_sum"]],
    ids=["ce-ignore", "mse-mean", "bce", "ce-sum"],
)
@pytest.mark.parametrize("cls", [GGNOperator, FisherOperator, EmpiricalFisherOperator], ids=["ggn", "fisher", "ef"])
def test_ragged_batches_equal_one_batch(make, cls):
    model, loss_fn, data = make()
    one = cls(model, loss_fn, data).to_dense()
    v = torch.randn(one.shape[0], generator=torch.Generator().manual_seed(0), dtype=DT)
    for cache in (True, False):
        op = cls(model, loss_fn, _split(data), cache=cache)
        scale = float(one.abs().max())
        torch.testing.assert_close(op.to_dense(), one, rtol=1e-12, atol=1e-12 * scale)
        torch.testing.assert_close(op @ v, one @ v, rtol=1e-12, atol=1e-12 * scale * len(v) ** 0.5)


def test_dataloader_and_a_fully_ignored_batch():
    model, loss_fn, (X, y) = _ce_ignore()
    order = torch.argsort((y == 2).to(torch.int64), stable=True)  # the ignored targets last
    X, y = X[order], y[order]
    one = GGNOperator(model, loss_fn, (X, y)).to_dense()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    for cls in (GGNOperator, EmpiricalFisherOperator, FisherOperator):
        op = cls(model, loss_fn, loader)
        assert not op.cache
        ref = EmpiricalFisherOperator(model, loss_fn, (X, y)).to_dense() if cls is EmpiricalFisherOperator else one
        torch.testing.assert_close(op.to_dense(), ref, rtol=1e-12, atol=1e-14)


# -- engines, snapshot, the user's model ------------------------------------------------------------
class _Cube(torch.autograd.Function):  # backward only: no forward-mode rule, no torch.func support
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class _CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(_Cube.apply(self.fc1(x)))


def test_falls_back_to_reverse_mode_and_says_why():
    torch.manual_seed(0)
    model = _CubeNet().to(DT)
    g = torch.Generator().manual_seed(0)
    data = (0.5 * torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT))
    loss_fn = nn.MSELoss()
    op = GGNOperator(model, loss_fn, data, cache=False)
    assert_operator_matches(op, reference_ggn(model, loss_fn, data))
    assert op.method == "reverse" and op.fallback_reason
    with pytest.raises(RuntimeError):
        GGNOperator(model, loss_fn, data, method="forward") @ torch.ones(op.shape[0], 3, dtype=DT)


class _CubeOnce(torch.autograd.Function):  # forward mode and vmap work; double backward is cut silently
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


class _CubeOnceNet(_CubeNet):
    def forward(self, x):
        return self.fc2(_CubeOnce.apply(self.fc1(x)))


def test_kept_graph_is_cross_checked_against_forward_mode():
    torch.manual_seed(0)
    model = _CubeOnceNet().to(DT)
    g = torch.Generator().manual_seed(0)
    data = (0.5 * torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT))
    op = GGNOperator(model, nn.MSELoss(), data)  # the kept graph is checked before any product
    assert not op.cache and op.engine == "forward" and "once_differentiable" in op.fallback_reason
    assert_operator_matches(op, reference_ggn(model, nn.MSELoss(), data))
    assert op.engine == "forward"  # recorded once, never changed by a product


def test_snapshot_and_user_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 3, generator=g, dtype=DT), torch.randint(0, 2, (8,), generator=g))
    before = copy.deepcopy(model.state_dict())
    ops = [
        GGNOperator(model, nn.CrossEntropyLoss(), data),
        FisherOperator(model, nn.CrossEntropyLoss(), data, mc_samples=2),
        EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), data),
    ]
    dense = [op.to_dense() for op in ops]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    for op, D in zip(ops, dense):
        torch.testing.assert_close(op.to_dense(), D)
    with torch.no_grad():
        model[0].weight.sub_(1.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-15)
    assert model.training and all(p.grad is None for p in model.parameters())


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss_fn",
    [nn.NLLLoss(), nn.L1Loss(), nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)), nn.HuberLoss()],
    ids=["nll", "l1", "ce-weighted", "huber"],
)
def test_fisher_rejects_unsupported_losses(loss_fn):
    model, _, data = CASES["mlp_softplus_ce"]()
    with pytest.raises(InputError, match="CrossEntropyLoss.*MSELoss.*BCEWithLogitsLoss"):
        FisherOperator(model, loss_fn, data)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_fisher_rejects_bad_mc_samples(bad):
    model, loss_fn, data = CASES["mlp_softplus_ce"]()
    with pytest.raises(InputError, match="mc_samples"):
        FisherOperator(model, loss_fn, data, mc_samples=bad)


def test_bad_options_and_unknown_reduction():
    model, loss_fn, data = CASES["mlp_softplus_ce"]()
    with pytest.raises(InputError, match="method"):
        GGNOperator(model, loss_fn, data, method="sideways")
    with pytest.raises(InputError, match="loss_hessian"):
        GGNOperator(model, loss_fn, data, loss_hessian="closed")
    plain = lambda out, y: nn.functional.cross_entropy(out, y)  # noqa: E731 - no .reduction
    with pytest.raises(InputError, match="reduction="):
        EmpiricalFisherOperator(model, plain, data)
    ok = EmpiricalFisherOperator(model, plain, data, reduction="mean").to_dense()
    torch.testing.assert_close(ok, EmpiricalFisherOperator(model, loss_fn, data).to_dense())
    # the GGN needs no reduction with one batch: the loss Hessian comes from autograd
    torch.testing.assert_close(GGNOperator(model, plain, data).to_dense(), GGNOperator(model, loss_fn, data).to_dense())


def _once_differentiable_square():
    from torch.autograd.function import once_differentiable

    class SqOD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * g * x

    return SqOD


class _DetachedSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * g * x.detach()


@pytest.mark.parametrize("square", ["once_differentiable", "detached"])
@pytest.mark.parametrize("cache", ["auto", False])
def test_ggn_refuses_a_loss_without_a_second_derivative(square, cache):
    """The loss Hessian by double backward would silently be zero: refused, not a zero GGN."""
    from nethessian.errors import InputError as NhInputError

    torch.manual_seed(0)
    fn = _once_differentiable_square() if square == "once_differentiable" else _DetachedSquare
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    loss = lambda o, y: fn.apply(o - y).mean()  # noqa: E731
    with pytest.raises(NhInputError, match="second derivative"):
        GGNOperator(model, loss, data, reduction="mean", cache=cache) @ torch.ones(26, dtype=torch.float64)
    # the same loss written with torch ops is accepted and equals the MSE GGN
    plain = GGNOperator(model, lambda o, y: ((o - y) ** 2).mean(), data, reduction="mean").to_dense()
    torch.testing.assert_close(plain, GGNOperator(model, torch.nn.MSELoss(), data).to_dense(), rtol=1e-10, atol=1e-12)
