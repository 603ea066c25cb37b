"""Objective.at (the same objective at other parameters) and Objective.fingerprint."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import nethessian._objective
from nethessian._objective import Objective
from nethessian.errors import InputError


def _problem(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    model.eval()
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def _objective(**kw):
    model, X, y = _problem()
    args = dict(model=model, loss_fn=nn.CrossEntropyLoss(), data=(X, y))
    args.update(kw)
    return Objective(args.pop("model"), args.pop("loss_fn"), args.pop("data"), **args)


def test_at_evaluates_at_theta_and_shares_everything_else():
    obj = _objective()
    theta = obj.theta0 + 0.05 * torch.arange(obj.size, dtype=torch.float64).sin()
    moved = obj.at(theta)
    assert moved.data is obj.data and moved.layout is obj.layout and moved.model is obj.model
    assert moved.reduction == obj.reduction
    assert abs(moved.value() - obj.value(theta)) <= 1e-12 * abs(obj.value(theta))
    torch.testing.assert_close(moved.gradient(), obj.gradient(theta), rtol=1e-12, atol=1e-14)
    # the reference: J by hand through the module at θ
    ref = torch.func.functional_call(obj.model, {**obj.params_dict(theta), **obj._buffers}, (obj.data.first().inputs,))
    J = nn.functional.cross_entropy(ref, obj.data.first().targets)
    assert abs(moved.value() - float(J)) <= 1e-12 * abs(float(J))
    theta.add_(1.0)  # the copy is a snapshot
    assert abs(moved.value() - obj.value(theta - 1.0)) <= 1e-12 * abs(moved.value())


def test_at_does_not_revalidate(monkeypatch):
    obj = _objective()
    calls = []
    monkeypatch.setattr(nethessian._objective, "validate", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(Objective, "_build", lambda self, *a, **k: calls.append(3))
    monkeypatch.setattr(Objective, "__init__", lambda self, *a, **k: calls.append(2))
    obj.at(obj.theta0 * 2)
    assert calls == []


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.float64), "theta", torch.zeros(2, 2)])
def test_at_refuses_a_wrong_theta(bad):
    obj = _objective()
    if isinstance(bad, torch.Tensor) and bad.ndim == 2:
        bad = torch.zeros(obj.size, 2, dtype=torch.float64)
    with pytest.raises(InputError):
        obj.at(bad)


def test_fingerprint_is_stable_for_equal_objectives():
    a, b = _objective(), _objective()
    assert a.fingerprint() == b.fingerprint() == a.fingerprint()
    assert len(a.fingerprint()) == 64
    assert a.at(a.theta0.clone()).fingerprint() == a.fingerprint()


def _variants():
    model, X, y = _problem()
    out = {
        "theta": lambda o: o.at(o.theta0 + 1e-12),
        "loss weight": lambda o: _objective(
            loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))
        ),
        "label smoothing": lambda o: _objective(loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1)),
        "ignore index": lambda o: _objective(loss_fn=nn.CrossEntropyLoss(ignore_index=2)),
        "reduction": lambda o: _objective(loss_fn=nn.CrossEntropyLoss(reduction="sum")),
        "one data bit": lambda o: _objective(
            data=(X.clone().index_put_((torch.tensor(0), torch.tensor(0)), X[0, 0] * (1 + 2**-50)), y)
        ),
        "targets": lambda o: _objective(data=(X, (y + 1) % 3)),
        "batching": lambda o: _objective(data=[(X[:8], y[:8]), (X[8:], y[8:])]),
    }
    return out


@pytest.mark.parametrize("what", list(_variants()))
def test_fingerprint_changes_with_what_the_numbers_depend_on(what):
    base = _objective()
    other = _variants()[what](base)
    assert other.fingerprint() != base.fingerprint()


def test_fingerprint_covers_fixed_parameters_buffers_and_modes():
    base = _objective(params=["0.*"]).fingerprint()
    model, X, y = _problem()
    with torch.no_grad():
        model[3].bias[0] += 1e-9  # an unselected parameter
    assert Objective(model, nn.CrossEntropyLoss(), (X, y), params=["0.*"]).fingerprint() != base
    model, X, y = _problem()
    with torch.no_grad():
        model[1].running_var[0] *= 1.001  # a buffer
    assert Objective(model, nn.CrossEntropyLoss(), (X, y), params=["0.*"]).fingerprint() != base
    model, X, y = _problem()
    model[1].train()  # one module's mode
    assert Objective(model, nn.CrossEntropyLoss(), (X, y), params=["0.*"]).fingerprint() != base


def test_fingerprint_of_callable_losses():
    def mse(out, t):
        return ((out - nn.functional.one_hot(t, 3)) ** 2).mean()

    def mse2(out, t):
        return ((out - nn.functional.one_hot(t, 3)) ** 2).sum()

    f = _objective(loss_fn=mse).fingerprint()
    assert _objective(loss_fn=mse).fingerprint() == f
    assert _objective(loss_fn=mse2).fingerprint() != f
    ce = nn.functional.cross_entropy
    p1 = _objective(loss_fn=functools.partial(ce, label_smoothing=0.1)).fingerprint()
    p2 = _objective(loss_fn=functools.partial(ce, label_smoothing=0.2)).fingerprint()
    assert p1 != p2


def test_fingerprint_of_streaming_data():
    model, X, y = _problem()
    ds = torch.utils.data.TensorDataset(X, y)

    def make(bs):
        return Objective(model, nn.CrossEntropyLoss(), torch.utils.data.DataLoader(ds, batch_size=bs))

    a = make(4)
    assert a.fingerprint() == make(4).fingerprint()
    assert a.fingerprint() != make(8).fingerprint()
    assert a.at(a.theta0.clone()).fingerprint() == a.fingerprint()


TEMPERATURE = 1.0


def _tempered(o, y):
    return torch.nn.functional.cross_entropy(o / TEMPERATURE, y)


def test_fingerprint_follows_globals_and_objects_the_loss_reads(monkeypatch):
    """A checkpoint must not resume after a module-level setting or a wrapped loss object changed."""
    import nethessian as nh

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    data = (torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,)))
    fp = lambda loss: nh.HessianOperator(model, loss, data).fingerprint()  # noqa: E731
    a = fp(_tempered)
    assert fp(_tempered) == a  # the same problem, the same fingerprint
    monkeypatch.setattr(__import__(__name__), "TEMPERATURE", 0.1)
    assert fp(_tempered) != a
    ce = torch.nn.CrossEntropyLoss()
    wrapped = lambda o, y: ce(o, y)  # noqa: E731
    b = fp(wrapped)
    ce.label_smoothing = 0.3
    assert fp(wrapped) != b
    closure_target = {"scale": 1.0}

    def scaled(o, y):
        return closure_target["scale"] * torch.nn.functional.cross_entropy(o, y)

    c = fp(scaled)
    closure_target["scale"] = 2.0
    assert fp(scaled) != c
