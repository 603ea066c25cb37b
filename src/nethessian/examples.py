"""Built-in problems: the classic two-layer network, and the benchmark MLP and CNN.

Each returns ``(model, loss_fn, data)`` ready for ``nh.hessian`` and friends.
Weights and synthetic data are drawn from ``seed`` (weights inside
``torch.random.fork_rng``, data from local ``torch.Generator``s), so runs are
reproducible and the caller's global random state is left as it was.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._checks import as_int
from .errors import InputError

__all__ = ["TwoLayerNet", "HalfSumSquaredError", "two_layer", "mlp", "cnn", "BUILTINS"]

#: hours of sleep, hours of study -> test score (the tutorial's data set)
SLEEP_STUDY = ((3.0, 5.0), (5.0, 1.0), (10.0, 2.0))
SCORES = (75.0, 82.0, 93.0)


class TwoLayerNet(nn.Module):
    """2-3-1 sigmoid network without biases: ŷ = f(f(X W1) W2)."""

    def __init__(self, generator: torch.Generator, dtype=torch.float64):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(2, 3, generator=generator, dtype=torch.float64).to(dtype))
        self.W2 = nn.Parameter(torch.randn(3, 1, generator=generator, dtype=torch.float64).to(dtype))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """ŷ = σ(σ(X W1) W2)."""
        z2 = X @ self.W1
        a2 = torch.sigmoid(z2)
        z3 = a2 @ self.W2
        return torch.sigmoid(z3)


class HalfSumSquaredError(nn.Module):
    """J = ½ Σ (y − ŷ)²  (a sum over samples: ``reduction = "sum"``)."""

    reduction = "sum"

    def forward(self, yhat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """½ Σ (y − ŷ)²."""
        return 0.5 * ((y - yhat) ** 2).sum()


def two_layer(seed: int = 0, dtype: torch.dtype = torch.float64):
    """The classic 2-3-1 sigmoid network on the sleep/study/score data set.

    X = [[3, 5], [5, 1], [10, 2]] scaled by each column's maximum, y = [75, 82, 93] / 100,
    weights W1 (2×3) and W2 (3×1) standard normal from ``seed``; J = ½ Σ (y − ŷ)².
    """
    g = torch.Generator().manual_seed(as_int("seed", seed))
    X = torch.tensor(SLEEP_STUDY, dtype=torch.float64)
    X = X / X.max(dim=0).values
    y = torch.tensor(SCORES, dtype=torch.float64).reshape(-1, 1) / 100
    model = TwoLayerNet(g, dtype)
    return model, HalfSumSquaredError(), (X.to(dtype), y.to(dtype))


def mlp(
    sizes: Sequence[int] = (784, 128, 64, 10),
    n: int = 1024,
    *,
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """MLP with ``activation`` between layers, cross-entropy, ``n`` synthetic samples.

    Inputs are standard normal, labels from a random "teacher" MLP so the problem is learnable.
    """
    acts = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "softplus": nn.Softplus}
    if activation not in acts:
        raise InputError(f"unknown activation {activation!r}; valid: {', '.join(acts)}")
    seed, n = as_int("seed", seed), as_int("n", n, minimum=1)
    sizes = [as_int("sizes", s, minimum=1) for s in sizes]
    if len(sizes) < 2:
        raise InputError(f"sizes needs an input and an output size, got {sizes}")

    def build():
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(acts[activation]())
        return nn.Sequential(*layers)

    model = _seeded(build, seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, sizes[0], generator=g, dtype=torch.float64)
    teacher = torch.randn(sizes[0], sizes[-1], generator=g, dtype=torch.float64)
    y = (X @ teacher).argmax(dim=1)
    return model, nn.CrossEntropyLoss(), (X.to(dtype), y)


def cnn(n: int = 256, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Small CNN on 28×28 inputs: conv 1→8→16 (3×3), ReLU, max-pool, linear 400→10 (P = 5,258)."""
    seed, n = as_int("seed", seed), as_int("n", n, minimum=1)
    model = _seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 10),
        ),
        seed,
    ).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (X.to(dtype), y)


def _seeded(build, seed: int) -> nn.Module:
    """``build()`` with PyTorch's default initialisation drawn from ``torch.manual_seed(seed)``.

    It runs inside ``torch.random.fork_rng``: the caller's global random state is restored
    afterwards (the weights are those of ``torch.manual_seed(seed); build()``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


BUILTINS = {"two-layer": two_layer, "mlp": mlp, "cnn": cnn}
