"""Every operator against the contract, the engine policy, the product path, and memory."""

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

import nethessian.operators._engine as engine_mod
from cases import CASES, DT, reference_hessian
from contract import assert_operator_contract
from nethessian._checkpoint import Checkpoint
from nethessian.errors import CheckpointError, DenseTooLargeError, DistributedError, InputError
from nethessian.operators._base import check_dense_size
from nethessian.operators._crosscheck import verify_jv
from nethessian.operators._engine import Engine, choose_batched, choose_engine
from nethessian.operators._fisher import EmpiricalFisherOperator, FisherOperator
from nethessian.operators._ggn import GGNOperator
from nethessian.operators._hessian import HessianOperator
from test_ggn_fisher import _CubeNet, reference_ef, reference_ggn


# -- the contract, three lines per operator -------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp_tanh_mse", "cnn_ce"])
def test_hessian_contract(name):
    model, loss_fn, data = CASES[name]()
    assert_operator_contract(
        lambda m, d: HessianOperator(m, loss_fn, d), model, data, lambda m, d: reference_hessian(m, loss_fn, d)
    )


@pytest.mark.parametrize("name", ["mlp_tanh_mse", "cnn_ce"])
def test_ggn_contract(name):
    model, loss_fn, data = CASES[name]()
    assert_operator_contract(
        lambda m, d: GGNOperator(m, loss_fn, d), model, data, lambda m, d: reference_ggn(m, loss_fn, d)
    )


def test_fisher_contract():
    model, loss_fn, data = CASES["mlp_softplus_ce"]()
    assert_operator_contract(
        lambda m, d: FisherOperator(m, loss_fn, d), model, data, lambda m, d: reference_ggn(m, loss_fn, d)
    )


def test_empirical_fisher_contract():
    model, loss_fn, data = CASES["mlp_softplus_ce"]()
    assert_operator_contract(
        lambda m, d: EmpiricalFisherOperator(m, loss_fn, d),
        model,
        data,
        lambda m, d: reference_ef(m, loss_fn, d, 1 / 12),
    )


def test_fingerprint_covers_matrix_options_not_engines():
    model, loss_fn, data = CASES["mlp_softplus_ce"]()
    base = FisherOperator(model, loss_fn, data, mc_samples=2, seed=0).fingerprint()
    assert FisherOperator(model, loss_fn, data, mc_samples=2, seed=1).fingerprint() != base
    assert FisherOperator(model, loss_fn, data, mc_samples=3, seed=0).fingerprint() != base
    assert FisherOperator(model, loss_fn, data, mc_samples=2, seed=0, cache=False).fingerprint() == base
    assert GGNOperator(model, loss_fn, data).fingerprint() != FisherOperator(model, loss_fn, data).fingerprint()


def test_dense_checkpoint_refuses_another_models_columns(tmp_path):
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    op = HessianOperator(model, loss_fn, data)
    path = tmp_path / "h.ckpt"
    D = op.to_dense(checkpoint=Checkpoint(path, {"what": "dense"}))
    again = op.at(op.objective.theta0.clone()).to_dense(checkpoint=Checkpoint(path, {"what": "dense"}))
    torch.testing.assert_close(again, D)  # the same operator resumes (here: is already done)
    other = op.at(op.objective.theta0 + 0.1)
    with pytest.raises(CheckpointError):
        other.to_dense(checkpoint=Checkpoint(path, {"what": "dense"}))


# -- the engine policy ----------------------------------------------------------------------------
def test_cache_with_a_forward_mode_method_is_refused():
    model, loss_fn, data = CASES["mlp_softplus_ce"]()
    with pytest.raises(InputError, match="cache=True"):
        HessianOperator(model, loss_fn, data, method="forward-over-reverse", cache=True)
    with pytest.raises(InputError, match="cache=True"):
        GGNOperator(model, loss_fn, data, method="forward", cache=True)
    op = HessianOperator(model, loss_fn, data, method="forward-over-reverse")  # cache="auto": no graph
    assert op.engine == "forward-over-reverse" and not op.cache


def _raiser(exc):
    def trial():
        raise exc

    return trial


def _ok(V):
    return V


@pytest.mark.parametrize(
    "exc",
    [
        DistributedError("rank 1 died"),
        InputError("bad"),
        torch.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("DefaultCPUAllocator: can't allocate memory"),
    ],
    ids=["distributed", "ours", "oom", "cpu-oom"],
)
def test_policy_never_swallows_our_errors_or_oom(exc):
    with pytest.raises(type(exc)):
        choose_engine([Engine("a", _ok, trial=_raiser(exc)), Engine("b", _ok)])
    big = Engine("a", lambda V: (_ for _ in ()).throw(exc) if V.shape[1] > 1 else V, timed_batching=True)
    with pytest.raises(type(exc)):
        choose_batched(big, torch.ones(3, 5))


def test_policy_falls_back_on_an_ad_gap_and_says_why():
    chosen, reason, fallback = choose_engine(
        [
            Engine("a", _ok, trial=_raiser(RuntimeError("no forward AD rule")), why="first"),
            Engine("b", _ok, why="second"),
        ]
    )
    assert chosen.name == "b" and "no forward AD rule" in fallback and "second" in reason


def test_batched_only_when_measurably_faster_and_bounded():
    import time

    seen = []

    def slow_batched(V):  # batching costs as much per column as a loop, plus overhead
        seen.append(V.shape[1])
        time.sleep(0.002 * V.shape[1] + (0.004 if V.shape[1] > 1 else 0.0))
        return V

    batched, why = choose_batched(Engine("e", slow_batched, timed_batching=True), torch.ones(3, 200))
    assert not batched and "loop" in why
    assert max(seen) <= engine_mod.TRIAL_COLUMNS and sum(seen) <= 5 * engine_mod.TRIAL_COLUMNS
    fast, _ = choose_batched(Engine("e", lambda V: time.sleep(0.002) or V, timed_batching=True), torch.ones(3, 200))
    assert fast


def test_engine_recorded_once_and_products_do_not_change_it():
    torch.manual_seed(0)
    model = _CubeNet().to(DT)  # no forward-mode rule
    g = torch.Generator().manual_seed(0)
    data = (0.5 * torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT))
    op = GGNOperator(model, nn.MSELoss(), data, cache=False)
    assert op.engine == "reverse" and op.method == "reverse" and "RuntimeError" in op.fallback_reason
    before = (op.engine, op.engine_reason)
    op @ torch.ones(op.shape[0], 4, dtype=DT)
    assert (op.engine, op.engine_reason) == before and op.batched is not None
    H = HessianOperator(*CASES["mlp_tanh_mse"](), cache=False)  # MSE(mean): no jvp(grad) in torch
    assert H.engine in ("forward-over-reverse", "double-backward") and H.engine_reason


# -- @once_differentiable: cross-checked, never silently wrong -------------------------------------
class _CubeOnceNoJvp(torch.autograd.Function):  # double backward cut silently, and no forward mode
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class _OnceNoJvpNet(_CubeNet):
    def forward(self, x):
        return self.fc2(_CubeOnceNoJvp.apply(self.fc1(x)))


def _once_problem(net):
    torch.manual_seed(0)
    model = net().to(DT)
    g = torch.Generator().manual_seed(0)
    X, y = 0.5 * torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 2, (6,), generator=g)
    return model, (X, y)


@pytest.mark.parametrize("cls", [GGNOperator, FisherOperator, EmpiricalFisherOperator])
@pytest.mark.parametrize("cache", ["auto", False])
def test_once_differentiable_without_forward_mode_is_refused(cls, cache):
    model, data = _once_problem(_OnceNoJvpNet)
    with pytest.raises(InputError, match="once_differentiable.*finite differences|finite differences.*"):
        cls(model, nn.CrossEntropyLoss(), data, cache=cache)


@pytest.mark.parametrize("cls", [GGNOperator, FisherOperator, EmpiricalFisherOperator])
def test_once_differentiable_with_forward_mode_uses_it(cls):
    from test_ggn_fisher import _CubeOnceNet

    model, data = _once_problem(_CubeOnceNet)
    op = cls(model, nn.CrossEntropyLoss(), data)
    assert op.engine == "forward" and "once_differentiable" in op.fallback_reason
    ref = (
        reference_ggn(model, nn.CrossEntropyLoss(), data)
        if cls is not EmpiricalFisherOperator
        else reference_ef(model, nn.CrossEntropyLoss(), data, 1 / 6)
    )
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="once_differentiable"):
        cls(model, nn.CrossEntropyLoss(), data, method="reverse")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_finite_difference_check_has_no_false_alarm_and_catches_errors(name, dtype):
    model, _, (X, _) = CASES[name]()
    model = model.to(dtype)
    X = X.to(dtype) if X.is_floating_point() else X
    op = GGNOperator(model, nn.MSELoss(), (X, model(X).detach()), method="forward")
    obj = op.objective

    def f(theta):
        return obj.forward(obj.params_dict(theta), X)

    def jv(v):
        return torch.func.jvp(f, (obj.theta0,), (v,))[1]

    verify_jv(jv, f, obj.theta0)  # forward mode vs finite differences: agrees
    with pytest.raises(engine_mod.EngineRejected, match="finite differences"):
        verify_jv(lambda v: 0.97 * jv(v), f, obj.theta0)


# -- one product path -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad,err",
    [
        (torch.ones(3, dtype=torch.complex128), "complex"),
        (torch.ones(3, dtype=torch.int64), "floating"),
        ("v", "torch.Tensor"),
    ],
)
def test_products_validate_with_the_shared_check(bad, err):
    model, loss_fn, data = CASES["two_layer"]()
    for op in (HessianOperator(model, loss_fn, data), GGNOperator(model, loss_fn, data)):
        if isinstance(bad, torch.Tensor):
            bad = torch.ones(op.shape[0], dtype=bad.dtype)
        with pytest.raises(InputError, match=err):
            op @ bad


# -- memory ---------------------------------------------------------------------------------------
def test_chunk_follows_the_measured_memory_per_column():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    X, y = torch.randn(10000, 4, dtype=DT), torch.randn(10000, 2, dtype=DT)
    op = HessianOperator(model, nn.MSELoss(), (X, y), method="double-backward")  # the kept graph (vmap columns)
    activations = 10000 * 32 * 8  # one hidden layer's activations in float64
    assert op.bytes_per_column >= activations
    assert op.chunk_size * op.bytes_per_column <= 2**30 or op.chunk_size == 1
    assert op.chunk_size < 256  # the vectors alone would allow 256 columns
    H = op.to_dense()
    torch.testing.assert_close(H[:, :3], op @ torch.eye(op.shape[0], 3, dtype=DT))


def test_dense_size_check_counts_one_chunk_of_products():
    assert check_dense_size(100, torch.float64, 10**6, 0) == 80_000
    with pytest.raises(DenseTooLargeError, match="one chunk of products"):
        check_dense_size(100, torch.float64, 10**6, 2 * 10**6)
    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    op = HessianOperator(model, loss_fn, data)
    P = op.shape[0]
    with pytest.raises(DenseTooLargeError, match="chunk"):
        op.to_dense(max_bytes=P * P * 8 + 8)


def test_from_objective_shares_the_objective_for_every_operator_kind():
    import nethessian as nh

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    data = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,)))
    loss_fn = torch.nn.CrossEntropyLoss()
    H = nh.HessianOperator(model, loss_fn, data)
    for cls in (nh.HessianOperator, nh.GGNOperator, nh.FisherOperator, nh.EmpiricalFisherOperator):
        shared = cls.from_objective(H.objective)
        fresh = cls(model, loss_fn, data)
        assert shared.objective is H.objective
        torch.testing.assert_close(shared.to_dense(), fresh.to_dense(), rtol=1e-12, atol=1e-14)
    with pytest.raises(nh.InputError, match="Objective"):
        nh.GGNOperator.from_objective(H)


class _TanhWrongWhenLarge(torch.autograd.Function):
    """tanh whose double backward drops a term only where |x| > 2 (hit by some batches only)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xs = torch.where(x.abs() > 2, x.detach(), x)
        return g * (1 - torch.tanh(xs) ** 2)


class _WrongTanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(_TanhWrongWhenLarge.apply(self.a(x)))


@pytest.mark.parametrize("cache", ["auto", False])
def test_a_wrong_double_backward_hit_by_a_later_batch_only_is_refused(cache):
    torch.manual_seed(0)
    model = _WrongTanhNet().double()
    small = (0.01 * torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    large = (5.0 + torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="no engine computes this operator correctly"):
        HessianOperator(model, nn.MSELoss(), [small, large], cache=cache)


@pytest.mark.parametrize("make", [HessianOperator, GGNOperator, EmpiricalFisherOperator])
@pytest.mark.parametrize("bad", [1, 3])
def test_an_infinite_loss_in_any_in_memory_batch_is_refused_at_construction(make, bad):
    from nethessian.errors import NonFiniteError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(4)]
    batches[bad][1][0, 0] = 123.0

    def loss(o, y):
        return ((o - y) ** 2).mean() + torch.where(y == 123.0, torch.inf, 0.0).sum()

    options = {"cache": False} if make is HessianOperator else {}
    with pytest.raises(NonFiniteError, match=f"batch {bad}"):
        make(model, loss, batches, reduction="mean", **options)


class _Identity(nn.Module):
    """The output is the parameter itself: the product's backward passes the vector straight through."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, dtype=torch.float64))

    def forward(self, x):
        return self.w * 1.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_product_never_writes_into_its_input(reduction):
    """The kept graph divides its result by the term count in place; a graph that hands the vector
    back unchanged (here H = I / count) must not have the caller's vector divided instead."""
    torch.manual_seed(0)
    data = [(torch.zeros(3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)) for _ in range(2)]

    def loss(out, y):
        return 0.5 * (out * out).sum()

    op = HessianOperator(_Identity(), loss, data, reduction=reduction)
    for v in (torch.randn(5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)):
        v0 = v.clone()
        out = op @ v
        assert torch.equal(v, v0)
        torch.testing.assert_close(out, v0 * (1.0 if reduction == "mean" else 2.0))


def test_estimators_without_a_checkpoint_do_not_fingerprint_the_operator(monkeypatch):
    """The fingerprint hashes the model and every batch: only a checkpoint needs it."""
    import nethessian as nh
    from nethessian.linalg._operator import Operator

    def refuse(self):
        raise AssertionError("fingerprint computed without a checkpoint")

    monkeypatch.setattr(Operator, "fingerprint", refuse)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    data = [(torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))]
    op = HessianOperator(model, nn.MSELoss(), data)
    assert nh.eigenvalues(op, k=2, tol=1e-6, ncv=12).converged
    nh.eigenvalues(op, k=2)  # P = 44 < ncv + 1: the dense path
    nh.trace(op, num_matvecs=6)
    nh.diagonal(op, method="estimate", num_matvecs=4)
    nh.diagonal(op)
    nh.spectral_density(op, num_probes=1, lanczos_steps=5)
