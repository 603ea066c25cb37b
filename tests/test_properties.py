"""Property-based: random MLP shapes, the dense Hessian equals the brute-force reference."""

import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import nethessian as nh
from cases import reference_hessian

ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


@settings(max_examples=25, deadline=None)
@given(
    n_in=st.integers(1, 4),
    hidden=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    n_out=st.integers(1, 3),
    n=st.integers(1, 6),
    act=st.sampled_from(sorted(ACTS)),
    ce=st.booleans(),
    seed=st.integers(0, 2**16),
    split=st.integers(1, 3),
)
def test_random_mlp_matches_reference(n_in, hidden, n_out, n, act, ce, seed, split):
    torch.manual_seed(seed)
    sizes = [n_in, *hidden, n_out]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([ACTS[act]()] if i < len(sizes) - 2 else [])
    model = nn.Sequential(*layers).double()
    X = torch.randn(n, n_in, dtype=torch.float64)
    if ce:
        loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, n_out, (n,))
    else:
        loss_fn, y = nn.MSELoss(), torch.randn(n, n_out, dtype=torch.float64)
    R = reference_hessian(model, loss_fn, (X, y))
    batches = [(X[i::split], y[i::split]) for i in range(min(split, n))]
    H = nh.hessian(model, loss_fn, batches)
    torch.testing.assert_close(H.dense, R, rtol=1e-9, atol=1e-12 * max(1.0, float(R.abs().max())))
    torch.testing.assert_close(H.dense, H.dense.T, rtol=1e-10, atol=1e-13 * max(1.0, float(R.abs().max())))
