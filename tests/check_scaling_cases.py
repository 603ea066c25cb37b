"""Problems for ``nh.check``'s false-alarm and detection tests: badly scaled, correct, and wrong.

Each factory takes a dtype and returns ``(model, loss_fn, data)``. ``CORRECT`` holds models whose
Hessian nethessian computes exactly (check must pass); ``WRONG`` holds models whose double
backward is wrong (check must fail).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

import nethessian as nh


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _small_mlp(dtype, act=nn.Tanh, sizes=(4, 5, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(dtype)


def _classification(dtype, n=12, d=4, k=3, seed=1, scale=None):
    g = _gen(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    if scale is not None:
        X = X * torch.as_tensor(scale, dtype=torch.float64)
    return X.to(dtype), torch.randint(0, k, (n,), generator=g)


def inputs_times_1e3(dtype):
    """Features multiplied by 1e3 (softplus keeps curvature at large pre-activations)."""
    model = _small_mlp(dtype, nn.Softplus)
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
    return model, nn.CrossEntropyLoss(), _classification(dtype, scale=1e3)


def inputs_times_1e3_tanh(dtype):
    return _small_mlp(dtype, nn.Tanh), nn.CrossEntropyLoss(), _classification(dtype, scale=1e3)


def bias_at_1000(dtype):
    """One hidden bias at 1000 (its unit saturates), the other units ordinary."""
    model = _small_mlp(dtype, nn.Tanh)
    with torch.no_grad():
        model[0].bias[0] = 1000.0
    return model, nn.CrossEntropyLoss(), _classification(dtype)


def output_bias_at_1000(dtype):
    """Regression with targets near 1000 and the output bias at 1000."""
    model = _small_mlp(dtype, nn.Softplus, sizes=(4, 5, 1))
    with torch.no_grad():
        model[2].bias[0] = 1000.0
    X, _ = _classification(dtype)
    y = (1000 + torch.randn(X.shape[0], 1, generator=_gen(3), dtype=torch.float64)).to(dtype)
    return model, nn.MSELoss(), (X, y)


def logspace_features(dtype):
    """Feature j scaled by logspace(-3, 3)[j]; first-layer weights scaled inversely, so all units work."""
    s = torch.logspace(-3, 3, 6, dtype=torch.float64)
    model = _small_mlp(dtype, nn.Softplus, sizes=(6, 5, 3))
    with torch.no_grad():
        model[0].weight.div_(s.to(dtype))
    return model, nn.CrossEntropyLoss(), _classification(dtype, d=6, scale=s)


def logspace_features_logistic(dtype):
    """Logistic regression with logspace(-3, 3) feature scales and ordinary weights."""
    torch.manual_seed(0)
    s = torch.logspace(-3, 3, 7, dtype=torch.float64)
    return nn.Linear(7, 3).to(dtype), nn.CrossEntropyLoss(), _classification(dtype, d=7, scale=s)


def mlp(dtype):
    return nh.examples.mlp(sizes=(8, 6, 4, 3), n=32, dtype=dtype, activation="softplus")


def cnn(dtype):
    """A small CNN whose dense Hessian is checked (P = 2·9+2 + 2·2·4+... < 200)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3), nn.Softplus(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    ).to(dtype)
    g = _gen(1)
    return (
        model,
        nn.CrossEntropyLoss(),
        (torch.randn(10, 1, 6, 6, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 3, (10,), generator=g)),
    )


def two_layer(dtype):
    return nh.examples.two_layer(seed=1, dtype=dtype)


CORRECT = {
    f.__name__: f
    for f in (
        inputs_times_1e3,
        inputs_times_1e3_tanh,
        bias_at_1000,
        output_bias_at_1000,
        logspace_features,
        logspace_features_logistic,
        mlp,
        cnn,
        two_layer,
    )
}


# -- wrong second derivatives --------------------------------------------------------------
class CubeOnce(torch.autograd.Function):
    """x³ whose backward is @once_differentiable: double backward drops the 6x term."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


class _CubeGradWrong(torch.autograd.Function):
    """3x²·g, whose own backward (the second derivative) says 3x instead of 6x."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 3 * x**2 * g

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        return 3 * x * g * gg, 3 * x**2 * gg  # d/dx is 6 x g: wrong by a factor 2


class CubeWrongDouble(torch.autograd.Function):
    """x³ with a correct gradient and a wrong double backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGradWrong.apply(x, g)


class _CubeNet(nn.Module):
    def __init__(self, fn, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fn = nn.Linear(3, 4).to(dtype), nn.Linear(4, 2).to(dtype), fn

    def forward(self, x):
        return self.fc2(self.fn.apply(self.fc1(x)))


def _cube_problem(fn, dtype):
    g = _gen(0)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64).to(dtype)
    return _CubeNet(fn, dtype), nn.MSELoss(), (X, torch.randn(6, 2, generator=g, dtype=torch.float64).to(dtype))


def once_differentiable_cube(dtype):
    return _cube_problem(CubeOnce, dtype)


def wrong_double_backward(dtype):
    return _cube_problem(CubeWrongDouble, dtype)


def wrong_double_backward_scaled_inputs(dtype):
    """The wrong double backward behind inputs ×1e3 (first layer ×1e-3): must still fail."""
    model, loss_fn, (X, y) = _cube_problem(CubeWrongDouble, dtype)
    with torch.no_grad():
        model.fc1.weight.mul_(1e-3)
    return model, loss_fn, (X * 1e3, y)


WRONG = {f.__name__: f for f in (once_differentiable_cube, wrong_double_backward, wrong_double_backward_scaled_inputs)}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
