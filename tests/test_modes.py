"""The model's mode decides batch norm; randomness in the forward pass is refused."""

import pytest
import torch
from torch import nn

import nethessian as nh
from cases import reference_hessian

DT = torch.float64


def _bn_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    with torch.no_grad():  # non-trivial running statistics
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m


def _data(n=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_follows_model_mode_and_keeps_running_stats(train):
    model, data = _bn_model(), _data()
    model.train(train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = nh.hessian(model, nn.MSELoss(), data).dense
    R = reference_hessian(model, nn.MSELoss(), data)  # functional_call in the same mode
    for k, v in model.state_dict().items():  # the reference may touch them: restore for the check
        v.copy_(before[k])
    torch.testing.assert_close(H, R, rtol=1e-10, atol=1e-12)
    op = nh.HessianOperator(model, nn.MSELoss(), data, cache=False)
    torch.testing.assert_close(op.to_dense(), R, rtol=1e-10, atol=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert model.training == train


def test_train_and_eval_batch_norm_differ():
    model, data = _bn_model(), _data()
    Ht = nh.hessian(model.train(), nn.MSELoss(), data).dense
    He = nh.hessian(model.eval(), nn.MSELoss(), data).dense
    assert float((Ht - He).abs().max()) > 1e-3


def test_batch_norm_train_mode_keeps_user_batches():
    """In train mode, batch statistics are per batch: splitting changes the cost (documented)."""
    model, (X, y) = _bn_model().train(), _data()
    one = nh.Objective(model, nn.MSELoss(), (X, y)).value()
    two = nh.Objective(model, nn.MSELoss(), [(X[:5], y[:5]), (X[5:], y[5:])]).value()
    assert one != pytest.approx(two)


def test_dropout_in_train_mode_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Linear(4, 2)).to(DT)
    with pytest.raises(nh.RandomModelError, match=r"1 \(Dropout, p=0.3\).*model.eval\(\).*allow_random=True"):
        nh.HessianOperator(model, nn.MSELoss(), _data())
    nh.HessianOperator(model.eval(), nn.MSELoss(), _data())
    nh.HessianOperator(model.train(), nn.MSELoss(), _data(), allow_random=True)


def test_custom_randomness_is_detected():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x + 0.1 * torch.randn_like(x))

    with pytest.raises(nh.RandomModelError, match="draws random numbers"):
        nh.HessianOperator(Noisy().to(DT).eval(), nn.MSELoss(), _data())


class _EMA(torch.nn.Module):
    """Updates an exponential average in place inside forward and reads it back."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("mu", torch.zeros(d, dtype=torch.float64))

    def forward(self, x):
        with torch.no_grad():
            self.mu.mul_(0.5).add_(0.5 * x.mean(0))
        return x - self.mu


@pytest.mark.parametrize("train", [False, True])
def test_a_forward_that_writes_and_reads_a_buffer_is_refused(train):
    """No cost has this model's gradient (the buffer path is hidden from backward): every engine
    would return a non-symmetric matrix. Refused, naming the buffer, and the model left as it was."""
    import nethessian as nh

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), _EMA(5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    m.train(train)
    data = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    before = m[1].mu.clone()
    for make in (nh.HessianOperator, nh.GGNOperator):
        with pytest.raises(nh.InputError, match="writes buffer.*1.mu"):
            make(m, torch.nn.CrossEntropyLoss(), data)
    with pytest.raises(nh.InputError, match="writes buffer"):
        nh.HessianOperator(m, torch.nn.CrossEntropyLoss(), data, method="finite-difference")
    assert torch.equal(m[1].mu, before)


def test_train_mode_batch_norm_running_stats_are_not_refused():
    import nethessian as nh

    torch.manual_seed(0)
    m = (
        torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        .double()
        .train()
    )
    op = nh.HessianOperator(
        m, torch.nn.CrossEntropyLoss(), (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))
    )
    torch.testing.assert_close(op.to_dense(), op.to_dense().T, rtol=1e-10, atol=1e-12)
