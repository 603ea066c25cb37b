"""Problems for the structured engine, kept as data: one entry per layer or combination.

Each factory returns ``(model, loss_fn, data)`` in float64 with a fixed seed; the
tests compare the structured engine's diagonal, blocks and dense Hessian with
autodiff on every entry. Sizes are tiny: exactness, not speed, is tested.
"""

from __future__ import annotations

import torch
from torch import nn

D = torch.float64


class Residual(nn.Module):
    """y = W2 (x + tanh(W1 x)) — a branch and an addition, traced by torch.fx."""

    def __init__(self):
        super().__init__()
        self.inp, self.f, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + torch.tanh(self.f(h)))


class TwoBranch(nn.Module):
    """Two parameterised branches of one tensor merged by a subtraction and a functional relu."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.c(torch.sigmoid(self.a(x)) - torch.nn.functional.softplus(self.b(x)))


class Tied(nn.Module):
    """Two layers sharing one weight (weight tying): not supported, falls back."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
        self.c = nn.Linear(3, 3)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


def _seed(build, seed=0):
    torch.manual_seed(seed)
    return build().to(D)


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _labels(n, c, seed=2):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _mlp(act, loss=None, n=6):
    model = _seed(lambda: nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)))
    return model, loss or nn.MSELoss(reduction="sum"), (_x(n, 3), _x(n, 2, seed=3))


def _ce(loss, n=7):
    model = _seed(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    return model, loss, (_x(n, 3), _labels(n, 3))


def _conv(layers, shape, loss=None, out=2):
    model = _seed(lambda: nn.Sequential(*layers)).eval()
    with torch.no_grad():
        y = model(_x(*shape))
    return model, loss or nn.MSELoss(), (_x(*shape), _x(*y.shape, seed=3))


def _batchnorm():
    model, loss, data = _conv(
        [nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)], (4, 1, 3, 3)
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model, loss, data


def _embedding():
    model = _seed(lambda: nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Tanh(), nn.Linear(12, 2)))
    idx = torch.randint(0, 6, (5, 4), generator=torch.Generator().manual_seed(4))
    return model, nn.CrossEntropyLoss(), (idx, _labels(5, 2))


def _ragged():
    model, loss, (X, y) = _ce(nn.CrossEntropyLoss(), n=8)
    return model, loss, [(X[:5], y[:5]), (X[5:], y[5:])]


def _bn_deep():
    model = _seed(
        lambda: nn.Sequential(
            nn.Linear(3, 4), nn.Tanh(), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)
        )
    ).eval()
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
    return model, nn.MSELoss(), (_x(5, 3), _x(5, 2, seed=3))


ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "logsigmoid": nn.LogSigmoid,
}

CASES = {
    **{f"act-{k}": (lambda a=a: _mlp(a())) for k, a in ACTIVATIONS.items()},
    "linear-leading-dims": lambda: (
        _seed(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))),
        nn.MSELoss(),
        (_x(4, 5, 3), _x(4, 5, 2, seed=3)),
    ),
    "flatten-dropout-identity": lambda: (
        _seed(
            lambda: nn.Sequential(
                nn.Flatten(), nn.Linear(6, 4), nn.Dropout(0.5), nn.Identity(), nn.Tanh(), nn.Linear(4, 2)
            )
        ).eval(),
        nn.MSELoss(),
        (_x(5, 2, 3), _x(5, 2, seed=3)),
    ),
    "ce-mean": lambda: _ce(nn.CrossEntropyLoss()),
    "ce-sum": lambda: _ce(nn.CrossEntropyLoss(reduction="sum")),
    "ce-weights-ignore-smoothing": lambda: _ce(
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=D), ignore_index=1, label_smoothing=0.1)
    ),
    "nll-after-logsoftmax": lambda: (
        _seed(lambda: nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.LogSoftmax(dim=1))),
        nn.NLLLoss(),
        (_x(6, 3), _labels(6, 3)),
    ),
    "bce-with-logits": lambda: _mlp(nn.Tanh(), nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0], dtype=D))),
    "mse-mean-elu": lambda: _mlp(nn.ELU(), nn.MSELoss(), n=5),
    "ce-ragged-batches": _ragged,
    "residual-fx": lambda: (_seed(Residual), nn.MSELoss(), (_x(5, 3), _x(5, 2, seed=3))),
    "two-branch-fx": lambda: (_seed(TwoBranch), nn.CrossEntropyLoss(), (_x(6, 3), _labels(6, 3))),
    "conv1d-stride-pad-dil": lambda: _conv(
        [nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)], (3, 2, 7)
    ),
    "conv2d-groups-maxpool": lambda: _conv(
        [nn.Conv2d(2, 4, 2, groups=2), nn.Softplus(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2)], (3, 2, 5, 5)
    ),
    "conv2d-avgpool-adaptive": lambda: _conv(
        [
            nn.Conv2d(1, 2, 2, padding=1),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2, 2),
        ],
        (3, 1, 4, 4),
    ),
    "batchnorm-eval": _batchnorm,
    "layernorm": lambda: (
        _seed(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))),
        nn.MSELoss(),
        (_x(5, 3), _x(5, 2, seed=3)),
    ),
    "embedding": _embedding,
    "convtranspose1d": lambda: _conv(
        [nn.ConvTranspose1d(2, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(14, 2)], (3, 2, 3)
    ),
    # deeper chains: the diagonal frontier below a Linear, factors through conv/pool, diagonals absorbed
    "mlp-deep-mixed-activations": lambda: (
        _seed(
            lambda: nn.Sequential(
                nn.Linear(3, 5),
                nn.Tanh(),
                nn.Linear(5, 4),
                nn.Sigmoid(),
                nn.Linear(4, 4),
                nn.Softplus(),
                nn.Linear(4, 3),
            )
        ),
        nn.CrossEntropyLoss(),
        (_x(7, 3), _labels(7, 3)),
    ),
    "cnn-relu-maxpool-overlapping": lambda: _conv(
        [
            nn.Conv2d(1, 2, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2, 3, 2),
            nn.ReLU(),
            nn.MaxPool2d(2, stride=1),
            nn.Flatten(),
            nn.Linear(12, 3),
        ],
        (3, 1, 10, 10),
    ),
    "cnn-tanh-avgpool-padding": lambda: _conv(
        [
            nn.Conv2d(1, 2, 2),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(2, 2, 2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(18, 2),
        ],
        (3, 1, 5, 5),
    ),
    "linear-leading-dims-deep": lambda: (
        _seed(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 2))),
        nn.MSELoss(),
        (_x(4, 5, 3), _x(4, 5, 2, seed=3)),
    ),
    "batchnorm-eval-deep": _bn_deep,
    "conv3d": lambda: _conv([nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2)], (2, 1, 3, 3, 3)),
}

UNSUPPORTED = {
    "batchnorm-train": (
        lambda: (
            _seed(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))),
            nn.MSELoss(),
            (_x(5, 3), _x(5, 2, seed=3)),
        ),
        "module '1': BatchNorm1d in train",
    ),
    "prelu": (lambda: _mlp(nn.PReLU().double()), "PReLU"),
    "weight-tying": (lambda: (_seed(Tied), nn.MSELoss(), (_x(5, 3), _x(5, 2, seed=3))), "weight tying"),
    "l1-loss": (lambda: _mlp(nn.Tanh(), nn.L1Loss()), "L1Loss"),
}
