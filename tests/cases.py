"""Problems as data: each factory returns (model, loss_fn, data) in float64.

A new architecture is one more entry in CASES. Sizes stay small (P < 200) so
the brute-force reference Hessian is quick.
"""

from __future__ import annotations

import torch
from torch import nn

import nethessian as nh
from nethessian._objective import math_attention

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _mlp(act, loss, sizes=(4, 6, 3), n=12, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    model = nn.Sequential(*layers).to(DT)
    g = _gen(seed + 1)
    X = torch.randn(n, sizes[0], generator=g, dtype=DT)
    if isinstance(loss, nn.CrossEntropyLoss):
        y = torch.randint(0, sizes[-1], (n,), generator=g)
    else:
        y = torch.randn(n, sizes[-1], generator=g, dtype=DT)
    return model, loss, (X, y)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = nn.functional.avg_pool2d(h, 2)
        return self.fc(h.flatten(1))


class LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


class TiedLM(nn.Module):
    """Embedding and output layer share one weight (weight tying)."""

    def __init__(self, vocab=7, dim=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


class WithUnused(nn.Module):
    """A parameter that gets no gradient: its blocks must be zero, not a crash."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(x)


def two_layer():
    return nh.examples.two_layer(seed=3)


def mlp_tanh_mse():
    return _mlp(nn.Tanh, nn.MSELoss())


def mlp_sigmoid_ce_sum():
    return _mlp(nn.Sigmoid, nn.CrossEntropyLoss(reduction="sum"), seed=1)


def mlp_softplus_ce():
    return _mlp(nn.Softplus, nn.CrossEntropyLoss(), sizes=(3, 5, 4, 3), seed=2)


def cnn_ce():
    torch.manual_seed(4)
    g = _gen(5)
    return (
        SmallCNN().to(DT),
        nn.CrossEntropyLoss(),
        (torch.randn(6, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)),
    )


def layernorm_mse():
    torch.manual_seed(6)
    g = _gen(7)
    return (
        LayerNormNet().to(DT),
        nn.MSELoss(reduction="sum"),
        (torch.randn(8, 4, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)),
    )


def attention_ce():
    torch.manual_seed(8)
    g = _gen(9)
    return (
        TinyAttention().to(DT),
        nn.CrossEntropyLoss(),
        (torch.randn(5, 3, 4, generator=g, dtype=DT), torch.randint(0, 2, (5,), generator=g)),
    )


def tied_ce():
    torch.manual_seed(10)
    g = _gen(11)
    return (
        TiedLM().to(DT),
        nn.CrossEntropyLoss(),
        (torch.randint(0, 7, (9,), generator=g), torch.randint(0, 7, (9,), generator=g)),
    )


def unused_mse():
    torch.manual_seed(12)
    g = _gen(13)
    return (
        WithUnused().to(DT),
        nn.MSELoss(),
        (torch.randn(7, 3, generator=g, dtype=DT), torch.randn(7, 2, generator=g, dtype=DT)),
    )


CASES = {
    f.__name__: f
    for f in (
        two_layer,
        mlp_tanh_mse,
        mlp_sigmoid_ce_sum,
        mlp_softplus_ce,
        cnn_ce,
        layernorm_mse,
        attention_ce,
        tied_ce,
        unused_mse,
    )
}


def reference_hessian(model, loss_fn, data, names=None):
    """Brute force: torch.autograd.functional.hessian of J over a flat θ (one batch)."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    X, y = data

    def J(t):
        parts = dict(zip(names, (p.reshape(s) for p, s in zip(torch.split(t, sizes), shapes))))
        with math_attention():
            out = torch.func.functional_call(model, parts, (X,))
        return loss_fn(out, y)

    return torch.autograd.functional.hessian(J, theta)
