"""The cost is over the whole data set: batch splitting never changes the numbers."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nethessian as nh

DT = torch.float64


def _model(out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(DT)


def _split(X, y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((X[i : i + s], y[i : i + s]))
        i += s
    return out


def _assert_same(model, loss_fn, one, many, **kw):
    H1 = nh.hessian(model, loss_fn, one, **kw).dense
    H2 = nh.hessian(model, loss_fn, many, **kw).dense
    torch.testing.assert_close(H2, H1, rtol=1e-12, atol=1e-14 * float(H1.abs().max()))
    o1, o2 = nh.Objective(model, loss_fn, one, **kw), nh.Objective(model, loss_fn, many, **kw)
    assert o2.value() == pytest.approx(o1.value(), rel=1e-13)
    torch.testing.assert_close(o2.gradient(), o1.gradient(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "loss_fn,classes",
    [
        (nn.MSELoss(), False),
        (nn.CrossEntropyLoss(), True),
        (nn.MSELoss(reduction="sum"), False),
        (nn.CrossEntropyLoss(reduction="sum"), True),
    ],
)
def test_ragged_batches_equal_one_batch(loss_fn, classes):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(15, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (15,), generator=g) if classes else torch.randn(15, 3, generator=g, dtype=DT)
    _assert_same(_model(), loss_fn, (X, y), _split(X, y, [5, 7, 3]))


def test_dataloader_with_ragged_last_batch():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(11, 4, generator=g, dtype=DT), torch.randint(0, 3, (11,), generator=g)
    loader = DataLoader(TensorDataset(X, y), batch_size=4)
    _assert_same(_model(), nn.CrossEntropyLoss(), (X, y), loader)


@pytest.mark.parametrize("weighted", [False, True])
def test_ignore_index_counts_non_ignored_targets(weighted):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(12, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    y[[0, 1, 2, 3, 9]] = -100  # batch 0 is mostly ignored: a naive per-batch mean would over-weight it
    w = torch.tensor([0.2, 1.0, 3.0], dtype=DT) if weighted else None
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100, weight=w)
    _assert_same(_model(), loss_fn, (X, y), _split(X, y, [5, 4, 3]))


def test_unknown_reduction_with_several_batches_asks_for_it():
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)

    def mse(out, t):
        return ((out - t) ** 2).mean()

    with pytest.raises(nh.InputError, match="reduction="):
        nh.HessianOperator(_model(), mse, _split(X, y, [3, 5]))
    # told the reduction, the batches weigh by sample count; mse averages over 3 outputs too,
    # so weighting by samples is the same as by terms here
    _assert_same(_model(), mse, (X, y), _split(X, y, [3, 5]), reduction="mean")
    nh.HessianOperator(_model(), mse, (X, y))  # one batch: weight 1, nothing to ask


def test_reduction_callable_counts_terms():
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(9, 4, generator=g, dtype=DT), torch.randn(9, 3, generator=g, dtype=DT)

    def mse(out, t):
        return ((out - t) ** 2).mean()

    _assert_same(_model(), mse, (X, y), _split(X, y, [2, 7]), reduction=lambda out, t: t.numel())


def test_one_shot_iterator_is_refused():
    X, y = torch.randn(4, 4, dtype=DT), torch.randn(4, 3, dtype=DT)
    with pytest.raises(nh.InputError, match="one-shot iterator"):
        nh.HessianOperator(_model(), nn.MSELoss(), ((X, y) for _ in range(2)))


@pytest.mark.parametrize("empty", [[], DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 3)))])
def test_empty_data_is_refused(empty):
    with pytest.raises(nh.InputError, match="empty"):
        nh.HessianOperator(_model(), nn.MSELoss(), empty)


def test_inputs_as_tuple_and_dict():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 1), nn.Linear(3, 1)

        def forward(self, u, v):
            return torch.tanh(self.a(u) + self.b(v))

    torch.manual_seed(0)
    m = Two().to(DT)
    u, v, y = torch.randn(6, 2, dtype=DT), torch.randn(6, 3, dtype=DT), torch.randn(6, 1, dtype=DT)
    H1 = nh.hessian(m, nn.MSELoss(), ((u, v), y)).dense
    H2 = nh.hessian(m, nn.MSELoss(), ({"u": u, "v": v}, y)).dense
    torch.testing.assert_close(H1, H2)


def test_float32_data_follows_float64_model():
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    op = nh.HessianOperator(_model(), nn.MSELoss(), (X, y))
    assert op.dtype == DT and (op @ torch.ones(op.shape[0], dtype=DT)).dtype == DT


def test_batch_with_every_target_ignored_adds_nothing():
    g = torch.Generator().manual_seed(7)
    X, y = torch.randn(9, 4, generator=g, dtype=DT), torch.randint(0, 3, (9,), generator=g)
    y[:3] = -100  # the first batch is entirely ignored
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    _assert_same(_model(), loss_fn, (X[3:], y[3:]), _split(X, y, [3, 6]))
    with pytest.raises(nh.InputError, match="every target is ignored"):
        nh.Objective(_model(), loss_fn, [(X[:3], y[:3])]).value()
