"""nh.input_hessian: per-sample blocks, the whole operator and mixed blocks against float64 references.

References are independent of the implementation: torch.autograd.functional.hessian
(or jacobian) of the cost written out by hand as a function of the inputs or
activations, and the closed form of the two-layer network (docs/input-hessian.md).
"""

import copy

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import nethessian as nh
from nethessian._input_hessian import input_hessian
from nethessian._objective import math_attention
from nethessian.errors import DenseTooLargeError, InputError

from helpers import assert_operator_matches

F64 = torch.float64


def flat_hessian(f, X):
    """Dense Hessian of scalar ``f`` w.r.t. tensor ``X`` (samples first), as ``(N·D, N·D)``."""
    n = X.numel()
    return hessian(f, X).reshape(n, n)


def diag_blocks(H, N):
    D = H.shape[0] // N
    return torch.stack([H[i * D : (i + 1) * D, i * D : (i + 1) * D] for i in range(N)])


def check(R, H, N):
    """Per-sample blocks and the operator against the dense reference ``H``."""
    assert tuple(R.per_sample.shape) == (N, H.shape[0] // N, H.shape[0] // N)
    torch.testing.assert_close(R.per_sample, diag_blocks(H, N), rtol=1e-10, atol=1e-12)
    assert_operator_matches(R.operator, H)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def regression(n=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64)


# -- against torch's Hessian of the loss w.r.t. the inputs -------------------------------------
def test_mlp_inputs():
    model, (X, y) = mlp(), regression()
    loss = nn.MSELoss()
    R = input_hessian(model, loss, (X, y))
    check(R, flat_hessian(lambda x: loss(model(x), y), X), 9)
    assert R.block_diagonal and R.coupling is None
    assert R.sample_shape == (3,) and R.batch_sizes == (9,) and R.dim == 3


def test_cnn_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()
    g = torch.Generator().manual_seed(2)
    X = torch.randn(4, 1, 6, 6, generator=g, dtype=F64)
    y = torch.tensor([0, 2, 1, 2])
    loss = nn.CrossEntropyLoss()
    R = input_hessian(model, loss, (X, y))
    check(R, flat_hessian(lambda x: loss(model(x), y), X), 4)
    assert R.sample_shape == (1, 6, 6)


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def tokens():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 10, (3, 4), generator=g), torch.tensor([1, 7, 3])


@pytest.mark.parametrize("at", ["embed", "encoder"])
def test_transformer_at_module(at):
    model = TinyTransformer().double().eval()
    ids, y = tokens()
    loss = nn.CrossEntropyLoss()
    R = input_hessian(model, loss, (ids, y), at=at)
    with torch.no_grad():
        E = model.embed(ids)
        A = E if at == "embed" else model.encoder(E)
    rest = (lambda a: model.head(model.encoder(a).mean(1))) if at == "embed" else (lambda a: model.head(a.mean(1)))
    with math_attention():  # the fused attention kernels have no second derivative
        H = flat_hessian(lambda a: loss(rest(a), y), A)
    check(R, H, 3)
    assert R.at == at and R.sample_shape == (4, 8)


class TwoLayerEncoder(nn.Module):
    """Token model called with keyword inputs, as language models are: model(input_ids=...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(10, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 10)

    def forward(self, input_ids):
        return self.head(self.encoder(self.embed(input_ids)).mean(1))


def test_transformer_inner_layer():
    model = TwoLayerEncoder().double().eval()
    ids, y = tokens()
    loss = nn.CrossEntropyLoss()
    R = input_hessian(
        model, loss, [({"input_ids": ids[:2]}, y[:2]), ({"input_ids": ids[2:]}, y[2:])], at="encoder.layers.0"
    )
    with torch.no_grad():
        A = model.encoder.layers[0](model.embed(ids))
    with math_attention():
        H = flat_hessian(lambda a: loss(model.head(model.encoder.layers[1](a).mean(1)), y), A)
    check(R, H, 3)
    assert R.block_diagonal


def test_token_inputs_need_at():
    model = TinyTransformer().double().eval()
    with pytest.raises(InputError, match=r"cannot be differentiated.*at='embed'"):
        input_hessian(model, nn.CrossEntropyLoss(), tokens())
    ids, y = tokens()
    with pytest.raises(InputError, match=r"no floating-point tensor.*at='embed'"):
        input_hessian(TwoLayerEncoder().double().eval(), nn.CrossEntropyLoss(), ({"input_ids": ids}, y))


# -- the two-layer network: closed form -------------------------------------------------------
def two_layer_closed_form(model, X, y):
    """∂²J/∂x_i² = σ'(z3)² u uᵀ + r [σ''(z3) u uᵀ + σ'(z3) W1 diag(W2 ⊙ σ''(z2)) W1ᵀ] (docs/input-hessian.md)."""
    W1, W2 = model.W1.detach(), model.W2.detach()[:, 0]
    s2 = torch.sigmoid(X @ W1)
    s3 = torch.sigmoid(torch.sigmoid(X @ W1) @ W2)
    d2, dd2 = s2 * (1 - s2), s2 * (1 - s2) * (1 - 2 * s2)
    d3, dd3 = s3 * (1 - s3), s3 * (1 - s3) * (1 - 2 * s3)
    r = s3 - y[:, 0]
    u = (d2 * W2) @ W1.T  # (N, 2): W1 (σ'(z2) ⊙ W2)
    uu = u[:, :, None] * u[:, None, :]
    curv = torch.einsum("ak,nk,bk->nab", W1, dd2 * W2, W1)
    return (d3**2 + r * dd3)[:, None, None] * uu + (r * d3)[:, None, None] * curv


@pytest.mark.parametrize("seed", [0, 1])
def test_two_layer_closed_form(seed):
    model, loss, (X, y) = nh.examples.two_layer(seed=seed)
    R = input_hessian(model, loss, (X, y))
    torch.testing.assert_close(R.per_sample, two_layer_closed_form(model, X, y), rtol=1e-10, atol=1e-13)
    check(R, flat_hessian(lambda x: loss(model(x), y), X), 3)


# -- batches: weights of mean losses, ragged splits ---------------------------------------------
def ragged(X, y, cuts=(2, 5)):
    a, b = cuts
    return [(X[:a], y[:a]), (X[a:b], y[a:b]), (X[b:], y[b:])]


@pytest.mark.parametrize("at", [None, "1"])
def test_independent_of_batch_splitting(at):
    model, (X, y) = mlp(), regression()
    one = input_hessian(model, nn.MSELoss(), (X, y), at=at)
    three = input_hessian(model, nn.MSELoss(), ragged(X, y), at=at)
    assert three.batch_sizes == (2, 3, 4)
    torch.testing.assert_close(three.per_sample, one.per_sample, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(three.operator.to_dense(), one.operator.to_dense(), rtol=1e-10, atol=1e-14)


def test_mean_weights_follow_term_counts():
    """Cross-entropy with ignored targets: a batch weighs its number of counted targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, _ = regression(7)
    y = torch.tensor([0, -100, 2, 1, -100, -100, 2])
    loss = nn.CrossEntropyLoss(ignore_index=-100)
    R = input_hessian(model, loss, ragged(X, y, (3, 6)))
    H = flat_hessian(lambda x: loss(model(x), y), X)
    check(R, H, 7)
    assert float(R.per_sample[1].abs().max()) == 0.0


# -- estimators take the operator -------------------------------------------------------------
def test_estimators_accept_the_operator():
    model, (X, y) = mlp(), regression()
    R = input_hessian(model, nn.MSELoss(), ragged(X, y))
    H = R.operator.to_dense()
    exact = torch.linalg.eigvalsh(H)
    top = nh.eigenvalues(R.operator, k=3, tol=1e-10)
    torch.testing.assert_close(top.eigenvalues.sort(descending=True).values, exact.flip(0)[:3], rtol=1e-8, atol=1e-12)
    assert abs(nh.trace(R.operator, exact=True).value - float(H.trace())) <= 1e-10 * float(H.abs().sum())
    torch.testing.assert_close(nh.diagonal(R.operator).values, H.diagonal(), rtol=1e-10, atol=1e-14)
    dens = nh.spectral_density(R.operator, num_probes=2, lanczos_steps=10, seed=0)
    assert torch.isfinite(torch.as_tensor(dens.density)).all()
    per = R.top_eigenvalues()
    torch.testing.assert_close(per, torch.linalg.eigvalsh(R.per_sample)[:, -1])
    torch.testing.assert_close(R.traces(), torch.stack([b.trace() for b in R.per_sample]))


# -- batch norm in train mode: samples couple within a batch ------------------------------------
def test_batch_norm_train_couples_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    X, y = regression(7)
    before = copy.deepcopy(model.state_dict())
    loss = nn.MSELoss()
    R = input_hessian(model, loss, [(X[:3], y[:3]), (X[3:], y[3:])])

    def J(x):  # batches of 3 and 4 samples, weighted by their term counts (numel of the outputs)
        m = copy.deepcopy(model)
        return (6 * loss(m(x[:3]), y[:3]) + 8 * loss(m(x[3:]), y[3:])) / 14

    H = flat_hessian(J, X)
    assert float(H[: 3 * 3, 3 * 3 :].abs().max()) == 0.0  # batches never couple
    assert float(H[:3, 3:9].abs().max()) > 1e-6  # samples within a batch do
    check(R, H, 7)
    assert not R.block_diagonal and "batch norm" in R.coupling and "(1)" in R.coupling
    for k, v in model.state_dict().items():  # running statistics untouched
        torch.testing.assert_close(v, before[k])


def test_batch_norm_eval_is_block_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    X, y = regression(5)
    R = input_hessian(model, nn.MSELoss(), (X, y))
    assert R.block_diagonal and R.coupling is None
    check(R, flat_hessian(lambda x: nn.MSELoss()(model(x), y), X), 5)


# -- mixed blocks ---------------------------------------------------------------------------
def joint_reference(model, loss, X, y):
    """``∂²J/∂θ∂x`` from the dense Hessian of ``(θ, x) ↦ J`` (θ flat in named_parameters order)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(th, x):
        parts = torch.split(th, [s.numel() for s in shapes])
        named = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        return loss(functional_call(model, named, (x,)), y)

    H = hessian(f, (theta, X))
    return H[0][1].reshape(theta.numel(), X.numel())


def test_mixed_block_inputs():
    model, (X, y) = mlp(), regression(6)
    loss = nn.MSELoss()
    R = input_hessian(model, loss, ragged(X, y, (2, 3)))
    M_ref = joint_reference(model, loss, X, y)
    M = R.mixed()
    assert tuple(M.shape) == tuple(M_ref.shape) and M.layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    torch.testing.assert_close(M.to_dense(), M_ref, rtol=1e-10, atol=1e-13)
    g = torch.Generator().manual_seed(0)
    u, W = torch.randn(M.shape[1], generator=g, dtype=F64), torch.randn(M.shape[0], 3, generator=g, dtype=F64)
    torch.testing.assert_close(M @ u, M_ref @ u, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(M.T @ W, M_ref.T @ W, rtol=1e-10, atol=1e-13)
    sub = R.mixed(params="2.*")
    torch.testing.assert_close(sub.to_dense(), M_ref[-12:], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(sub.T @ W[-12:], M_ref[-12:].T @ W[-12:], rtol=1e-10, atol=1e-13)


def test_mixed_block_at_activation():
    """Parameters after `at`: the partial ∂²J/∂θ∂a; before it: (∂²J/∂a²)(∂a/∂θ)."""
    model, (X, y) = mlp(), regression(4)
    loss = nn.MSELoss()
    R = input_hessian(model, loss, (X, y), at="1")
    M = R.mixed().to_dense()
    with torch.no_grad():
        A = model[1](model[0](X))
    after = joint_reference(model[2], loss, A, y)  # 2.weight, 2.bias

    def grad_a(th):  # θ_before ↦ ∇_a J(a(θ))
        W, b = th[:15].reshape(5, 3), th[15:]
        a = torch.tanh(X @ W.T + b)
        return torch.autograd.grad(loss(model[2](a), y), a, create_graph=True)[0].reshape(-1)

    th0 = torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach()])
    before = jacobian(grad_a, th0).T  # (P_before, N·D)
    torch.testing.assert_close(M, torch.cat([before, after]), rtol=1e-10, atol=1e-13)


# -- activations with a sample axis that is not the first -----------------------------------------
class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):  # x: (B, S, E); lin works on (S, B, E)
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1).mean(1))


def test_sample_dim():
    model = SeqFirst().double()
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(3, 2, 3, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)
    loss = nn.MSELoss()
    R = input_hessian(model, loss, (X, y), at="lin", sample_dim=1)
    with torch.no_grad():
        A = model.lin(X.transpose(0, 1))  # (S, B, E)
    Hs = hessian(lambda a: loss(model.head(torch.tanh(a).transpose(0, 1).mean(1)), y), A)
    H = Hs.permute(1, 0, 2, 4, 3, 5).reshape(18, 18)  # samples first
    check(R, H, 3)
    assert R.sample_shape == (2, 3)


# -- errors and hygiene ----------------------------------------------------------------------
class TwoOutputs(nn.Module):
    def forward(self, x):
        return x, x


class TupleInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.two = nn.Linear(3, 2).double(), TwoOutputs()

    def forward(self, x):
        return self.two(self.lin(x))[0]


class Unused(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.spare = net, nn.Linear(2, 2).double()

    def forward(self, x):
        return self.net(x)


def test_errors_and_hooks_removed():
    model, (X, y) = mlp(), regression(4)
    with pytest.raises(InputError, match="no module named 'nope'"):
        input_hessian(model, nn.MSELoss(), (X, y), at="nope")
    twice = nn.Sequential(model[0], model[1], nn.Linear(5, 3), model[1]).double()
    with pytest.raises(InputError, match="more than once"):
        input_hessian(twice, nn.MSELoss(), (X, y[:, :1].expand(4, 3).contiguous()), at="1")
    assert not model[1]._forward_hooks  # removed after the error
    with pytest.raises(InputError, match="did not run"):
        input_hessian(Unused(model), nn.MSELoss(), (X, y), at="spare")
    with pytest.raises(InputError, match="returns a tuple, not a floating-point tensor"):
        input_hessian(TupleInside(), nn.MSELoss(), (X, y), at="two")
    for bad in (1.5, "0"):
        with pytest.raises(InputError, match="sample_dim"):
            input_hessian(model, nn.MSELoss(), (X, y), sample_dim=bad)
    with pytest.raises(DenseTooLargeError, match="max_bytes"):
        input_hessian(model, nn.MSELoss(), (X, y), max_bytes=100)
    assert input_hessian(model, nn.MSELoss(), (X, y), per_sample=False).per_sample is None
    for m in model.modules():
        assert not m._forward_hooks


def test_works_under_no_grad_and_float32():
    model, (X, y) = mlp(), regression(5)
    ref = input_hessian(model, nn.MSELoss(), (X, y)).per_sample
    with torch.no_grad():
        R = input_hessian(copy.deepcopy(model).float(), nn.MSELoss(), (X.float(), y.float()))
    assert R.per_sample.dtype == torch.float32
    torch.testing.assert_close(R.per_sample.double(), ref, rtol=1e-4, atol=1e-6)


def test_summary_and_to_dict():
    model, loss, data = nh.examples.two_layer(seed=0)
    R = input_hessian(model, loss, data)
    d = R.to_dict()
    assert d["num_samples"] == 3 and d["dim"] == 2 and d["block_diagonal"] and d["coupling"] is None
    exact = torch.linalg.eigvalsh(two_layer_closed_form(model, *data))[:, -1]
    torch.testing.assert_close(torch.tensor(d["top_eigenvalue"], dtype=F64), exact, rtol=1e-10, atol=1e-14)
    text = R.summary(limit=2)
    assert "N = 3 samples" in text and f"{d['top_eigenvalue'][0]:+.6e}" in text and "1 more" in text
    assert "per_sample" in R.to_dict(blocks=True)


def test_to_dense_checkpoint_and_fingerprint(tmp_path):
    from nethessian._checkpoint import Checkpoint
    from nethessian.errors import CheckpointError

    model, (X, y) = mlp(), regression(4)
    R = input_hessian(model, nn.MSELoss(), (X, y))
    path = tmp_path / "dense.pt"
    first = R.operator.to_dense(checkpoint=Checkpoint(path, {}))
    torch.testing.assert_close(R.operator.to_dense(checkpoint=Checkpoint(path, {})), first)  # resumed
    other = input_hessian(model, nn.MSELoss(), (X, y), at="1")
    assert other.operator.fingerprint() != R.operator.fingerprint()
    moved = input_hessian(model, nn.MSELoss(), (X + 1, y))
    assert moved.operator.fingerprint() != R.operator.fingerprint()
    with pytest.raises(CheckpointError):  # another problem's columns are refused
        moved.operator.to_dense(checkpoint=Checkpoint(path, {}))
    M = R.mixed()
    torch.testing.assert_close(M.T.to_dense(), M.to_dense().T, rtol=1e-12, atol=1e-15)
    with pytest.raises(InputError, match="checkpoint"):
        M.to_dense(checkpoint=Checkpoint(tmp_path / "m.pt", {}))


def test_per_sample_blocks_cost_d_products(monkeypatch):
    """1 product for the coupling test, then D (no coupling) or max_b B_b · D (coupling) — never N·D."""
    from nethessian import _input_operator

    columns = []
    real = _input_operator._Engine.hessian
    monkeypatch.setattr(_input_operator._Engine, "hessian", lambda self, V: columns.append(V.shape[1]) or real(self, V))
    model, (X, y) = mlp(), regression(9)
    input_hessian(model, nn.MSELoss(), ragged(X, y))
    assert sum(columns) == 1 + 3
    columns.clear()
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    input_hessian(bn, nn.MSELoss(), ragged(X, y))  # batches of 2, 3, 4 samples
    assert sum(columns) == 1 + 4 * 3


def test_dataloader_matches_batches():
    from torch.utils.data import DataLoader, TensorDataset

    model, (X, y) = mlp(), regression(9)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)  # batches of 4, 4, 1
    R = input_hessian(model, nn.MSELoss(), loader, at="1")
    ref = input_hessian(model, nn.MSELoss(), (X, y), at="1")
    assert R.batch_sizes == (4, 4, 1)
    torch.testing.assert_close(R.per_sample, ref.per_sample, rtol=1e-10, atol=1e-14)
    assert (R.operator @ torch.zeros(R.operator.shape[0], 0, dtype=F64)).shape == (R.operator.shape[0], 0)


def test_at_root_is_the_loss_hessian():
    """at="" (the model itself): the Hessian w.r.t. the outputs; for a mean squared error 2/(N·C) I."""
    model, (X, y) = mlp(), regression(6)
    R = input_hessian(model, nn.MSELoss(), ragged(X, y, (1, 4)), at="")
    torch.testing.assert_close(R.per_sample, torch.eye(2, dtype=F64).expand(6, 2, 2) * 2 / 12, rtol=1e-12, atol=1e-15)


class AbsBySqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x * x)  # finite value at 0, NaN derivative there


def test_non_finite_products_are_refused():
    from nethessian.errors import NonFiniteError

    torch.manual_seed(0)
    model = nn.Sequential(AbsBySqrt(), nn.Linear(3, 2)).double()
    X, y = regression(4)
    X[1, 2] = 0.0
    with pytest.raises(NonFiniteError, match="not finite"):
        input_hessian(model, nn.MSELoss(), (X, y))
