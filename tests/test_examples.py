"""Built-in examples: reproducible per seed, and the caller's global random state left alone."""

from __future__ import annotations

import pytest
import torch

import nethessian as nh
from nethessian.errors import InputError


@pytest.mark.parametrize(
    "make",
    [
        lambda s: nh.examples.mlp(sizes=(5, 4, 3), n=16, seed=s),
        lambda s: nh.examples.cnn(n=4, seed=s),
        lambda s: nh.examples.two_layer(seed=s),
    ],
)
def test_examples_leave_the_global_random_state_alone(make):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make(0)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    "make", [lambda s: nh.examples.mlp(sizes=(5, 4, 3), n=16, seed=s), lambda s: nh.examples.cnn(n=4, seed=s)]
)
def test_examples_are_deterministic_per_seed(make):
    (m1, _, (X1, y1)), (m2, _, (X2, y2)), (m3, _, _) = make(0), make(0), make(1)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    assert any(not torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    # PyTorch's default initialisation, as with torch.manual_seed(seed) before building the model
    torch.manual_seed(0)
    first = torch.nn.Linear(5, 4) if m1[0].weight.shape == (4, 5) else torch.nn.Conv2d(1, 8, 3)
    torch.testing.assert_close(m1[0].weight, first.weight.to(m1[0].weight.dtype), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match", [({"seed": "1"}, "seed"), ({"n": 2.5}, "n"), ({"activation": "gelu"}, "activation")]
)
def test_example_options_are_checked(kwargs, match):
    with pytest.raises(InputError, match=match):
        nh.examples.mlp(sizes=(5, 4, 3), **kwargs)
