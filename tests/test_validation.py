"""Construction-time validation: single-pass data, random data pipelines, mutated buffers,
non-finite losses in any batch, broadcasting losses."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import nethessian as nh
from nethessian._objective import Objective
from nethessian.errors import InputError, NonFiniteError, RandomModelError

DT = torch.float64


def _mlp(bn=False, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(3, 4)] + ([nn.BatchNorm1d(4)] if bn else []) + [nn.Tanh(), nn.Linear(4, 2)]
    m = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.7)
    return m


def _data(n=12, dtype=DT, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randn(n, 2, generator=g, dtype=dtype)


def _batches(X, y, size=4):
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def _reference_hessian(model, loss_fn, X, y, mean_over=None):
    """Dense float64 Hessian of J(θ) = loss over (X, y) by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def J(t):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.tensor(s).prod()) if len(s) else 1
            parts[n] = t[i : i + k].reshape(s)
            i += k
        out = torch.func.functional_call(model, {**parts, **{k: b.clone() for k, b in buffers.items()}}, (X,))
        return loss_fn(out, y)

    return torch.autograd.functional.hessian(J, theta)


# -- item 3: single-pass data ---------------------------------------------------------------------
class _StoredIterator:
    """An iterable whose __iter__ returns the same iterator every time (one pass only)."""

    def __init__(self, batches):
        self._it = iter(batches)

    def __iter__(self):
        return self._it


class _OneShotDataset(IterableDataset):
    def __init__(self, X, y):
        self._samples = zip(X, y)

    def __iter__(self):
        return self._samples


class _FreshDataset(IterableDataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        return zip(self.X, self.y)


@pytest.mark.parametrize("kind", ["stored iterator", "one-shot IterableDataset"])
def test_single_pass_data_is_refused_not_truncated(kind):
    X, y = _data()
    data = (
        _StoredIterator(_batches(X, y))
        if kind == "stored iterator"
        else DataLoader(_OneShotDataset(X, y), batch_size=4)
    )
    with pytest.raises(InputError, match="first pass and 0 on a later one: it can be iterated only once"):
        Objective(_mlp(), nn.MSELoss(), data)


def test_re_iterable_iterable_dataset_is_accepted_and_exact():
    X, y = _data()
    streamed = Objective(_mlp(), nn.MSELoss(), DataLoader(_FreshDataset(X, y), batch_size=4))
    with torch.no_grad():
        ref = float(nn.MSELoss()(_mlp()(X), y))
    assert abs(streamed.value() - ref) <= 1e-12 * abs(ref)
    assert streamed.data._first_count == 3


# -- item 5: buffers written by the forward in eval mode ---------------------------------------------
class _Doubler(nn.Module):
    """Multiplies its output by a buffer that the forward doubles in place (in any mode)."""

    def __init__(self):
        super().__init__()
        self.lin = _mlp()
        self.register_buffer("scale", torch.ones((), dtype=DT))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.scale.mul_(2.0)
        self.calls += 1
        return self.lin(x) * self.scale


@pytest.mark.parametrize("cache", [True, False])
def test_buffers_written_in_eval_mode_do_not_drift(cache):
    X, y = _data()
    model = _Doubler().eval()
    op = nh.HessianOperator(model, nn.MSELoss(), (X, y), cache=cache)
    v = torch.linspace(-1, 1, op.shape[0], dtype=DT)
    first = op @ v
    for _ in range(3):
        torch.testing.assert_close(op @ v, first, rtol=1e-12, atol=1e-14)
    values = [op.objective.value() for _ in range(3)]
    assert max(values) - min(values) <= 1e-12 * abs(values[0])
    # every forward starts from the snapshot: it sees scale = 2, as the first call on the model would
    lin = _mlp()
    R = _reference_hessian(lin, lambda out, t: nn.functional.mse_loss(2.0 * out, t), X, y)
    torch.testing.assert_close(first, R @ v, rtol=1e-10, atol=1e-12)
    assert float(model.scale) == 1.0 and int(model.calls) == 0  # the user's model is untouched


# -- item 6: randomness in the data pipeline -----------------------------------------------------------
class _Augmented(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + 0.1 * torch.randn(self.X[i].shape, dtype=self.X.dtype), self.y[i]


@pytest.mark.parametrize("case", ["shuffle with train-mode batch norm", "random augmentation"])
def test_random_data_pipeline_is_refused(case):
    X, y = _data(n=32)
    if case.startswith("shuffle"):
        model, data = _mlp(bn=True).train(), DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
        fix = "shuffle=False or model.eval"
    else:
        model, data = _mlp(), DataLoader(_Augmented(X, y), batch_size=8)
        fix = "random augmentation"
    with pytest.raises(RandomModelError, match=f"two passes over the data give different costs.*{fix}"):
        nh.HessianOperator(model, nn.MSELoss(), data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shuffling_with_an_eval_model_is_accepted(dtype):
    X, y = _data(n=64, dtype=dtype)
    model = _mlp(bn=True, dtype=dtype).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
    for seed in range(3):  # several shuffles: rounding differences must never trip the check
        torch.manual_seed(seed)
        op = nh.HessianOperator(model, nn.MSELoss(), DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True))
    v = torch.linspace(-1, 1, op.shape[0], dtype=DT)
    R = _reference_hessian(model.double(), nn.MSELoss(), X.double(), y.double())
    rtol = 1e-10 if dtype == DT else 1e-4
    torch.testing.assert_close((op @ v.to(dtype)).double(), R @ v, rtol=rtol, atol=rtol * float(R.abs().max()))


# -- item 7: a non-finite loss in any batch ----------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 1])
@pytest.mark.parametrize("streaming", [False, True])
def test_infinite_loss_in_any_batch_is_named(bad, streaming):
    X, y = _data(n=8, dtype=torch.float32)
    y = y.clone()
    y[4 * bad] = 1e20  # finite data; its squared error overflows float32
    batches = _batches(X, y)
    data = DataLoader(TensorDataset(X, y), batch_size=4) if streaming else batches
    model = _mlp(dtype=torch.float32)
    # caught while constructing, whichever batch holds it, in memory or streamed
    with pytest.raises(NonFiniteError, match=f"batch {bad}"):
        Objective(model, nn.MSELoss(), data)
    for make in (nh.HessianOperator, nh.GGNOperator, nh.EmpiricalFisherOperator):
        with pytest.raises(NonFiniteError, match=f"batch {bad}"):
            make(model, nn.MSELoss(), data)


# -- item 11: outputs and targets that broadcast into a larger array -----------------------------------
def _sq(out, t):
    return ((out - t) ** 2).mean()


@pytest.mark.parametrize("shapes", [((12, 1), (12,)), ((12,), (12, 1)), ((1, 12), (12, 1))])
def test_callable_loss_that_broadcasts_is_flagged(shapes):
    out_shape, t_shape = shapes
    X, y = _data()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1).double()

        def forward(self, x):
            return self.lin(x).reshape(out_shape)

    with pytest.warns(UserWarning, match=r"broadcasts them to \(12, 12\): a larger array than either.*reshape"):
        Objective(Net(), _sq, (X, y[:, 0].reshape(t_shape)))


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda out, t: ((out[:, 0] - t) ** 2).mean(),  # reshapes itself
        lambda out, t: nn.functional.mse_loss(out.squeeze(1), t),
        lambda out, t: (nn.functional.softplus(out[:, 0]) - t * out[:, 0]).mean(),
    ],
)
def test_loss_that_reshapes_itself_is_not_flagged(loss_fn):
    X, y = _data()
    model = nn.Linear(3, 1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj = Objective(model, loss_fn, (X, y[:, 0]))
    with torch.no_grad():
        ref = float(loss_fn(model(X), y[:, 0]))
    assert abs(obj.value() - ref) <= 1e-12 * abs(ref)


def test_broadcasting_that_does_not_grow_is_accepted():
    X, y = _data()
    weights = torch.rand(12, 1, dtype=DT)  # per-sample weights against (12, 2) outputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        obj = Objective(_mlp(), lambda out, w: (out**2 * w).mean(), (X, weights))
    with torch.no_grad():
        ref = float((_mlp()(X) ** 2 * weights).mean())
    assert abs(obj.value() - ref) <= 1e-12 * ref


# -- item 15b: a callable loss over padded sequences ------------------------------------------------
def test_padded_sequences_need_a_token_count():
    """Token-mean cross-entropy over ragged, padded batches: reduction=count callable gives the exact cost."""
    g = torch.Generator().manual_seed(3)
    emb = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7)).double()
    lengths = [[5, 2], [3, 1, 4]]
    batches = []
    for batch_lengths in lengths:
        T = max(batch_lengths)
        x = torch.randint(0, 7, (len(batch_lengths), T), generator=g)
        t = torch.randint(0, 7, (len(batch_lengths), T), generator=g)
        for i, L in enumerate(batch_lengths):
            t[i, L:] = -100  # padding
        batches.append((x, t))

    def token_mean(out, t):
        return nn.functional.cross_entropy(out.reshape(-1, 7), t.reshape(-1), ignore_index=-100)

    def tokens(out, t):
        return int((t != -100).sum())

    with pytest.raises(InputError, match="number of sequences.*tokens.*callable"):
        Objective(emb, token_mean, batches)
    obj = Objective(emb, token_mean, batches, reduction=tokens)
    with torch.no_grad():
        all_out = torch.cat([emb(x).reshape(-1, 7) for x, _ in batches])
    all_t = torch.cat([t.reshape(-1) for _, t in batches])
    ref = float(nn.functional.cross_entropy(all_out, all_t, ignore_index=-100))
    assert abs(obj.value() - ref) <= 1e-12 * ref
    by_sequences = Objective(emb, token_mean, batches, reduction="mean").value()
    assert abs(by_sequences - ref) > 1e-6 * ref  # the sequence count gives another (wrong) cost


@pytest.mark.parametrize("bad", [-1, float("nan"), "3"])
def test_a_bad_count_is_refused(bad):
    X, y = _data()
    with pytest.raises(InputError, match="reduction callable returned"):
        Objective(_mlp(), _sq, _batches(X, y), reduction=lambda out, t: bad).value()
