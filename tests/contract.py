"""The operator contract: what every curvature operator must satisfy, in one reusable check.

``assert_operator_matches(op, dense)`` checks products and exports against a dense
reference; ``assert_operator_contract(make, model, data, reference)`` adds ``at(theta)``
(against a fresh operator built at θ) and the fingerprint. A new operator passes with

    model, loss_fn, data = CASES["mlp_tanh_mse"]()
    assert_operator_contract(lambda m, d: MyOperator(m, loss_fn, d), model, data,
                             lambda m, d: my_reference(m, loss_fn, d))
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def assert_operator_matches(op, dense: torch.Tensor, *, rtol: float = 1e-10, seed: int = 0) -> None:
    """Check ``op`` against a dense reference: vectors, matrices, exports and symmetry."""
    P = dense.shape[0]
    assert tuple(op.shape) == (P, P)
    scale = float(dense.abs().max()) or 1.0
    atol = rtol * scale
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(P, generator=g, dtype=dense.dtype)
    V = torch.randn(P, 5, generator=g, dtype=dense.dtype)
    torch.testing.assert_close(op @ v, dense @ v, rtol=rtol, atol=atol * P**0.5)
    HV = op @ V
    torch.testing.assert_close(HV, dense @ V, rtol=rtol, atol=atol * P**0.5)
    for j in range(V.shape[1]):  # a matrix product equals its columns
        torch.testing.assert_close(HV[:, j], op @ V[:, j], rtol=rtol, atol=atol * P**0.5)
    torch.testing.assert_close(op.to_dense(), dense, rtol=rtol, atol=atol)
    S = op.to_scipy()
    x = np.random.default_rng(seed).standard_normal(P)
    np.testing.assert_allclose(S @ x, dense.numpy() @ x, rtol=rtol, atol=atol * P**0.5 * np.abs(x).max())
    Xm = np.random.default_rng(seed + 1).standard_normal((P, 3))
    np.testing.assert_allclose(S.matmat(Xm), dense.numpy() @ Xm, rtol=rtol, atol=atol * P**0.5 * np.abs(Xm).max())
    D = op.to_dense()
    assert float((D - D.T).abs().max()) <= 1e3 * torch.finfo(D.dtype).eps * scale


def model_at(model, names, theta: torch.Tensor):
    """A deep copy of ``model`` with the parameters ``names`` set from the flat ``theta``."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    i = 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_(theta[i : i + p.numel()].reshape(p.shape))
            i += p.numel()
    return m


def _perturbed(data, seed):
    X, y = data
    g = torch.Generator().manual_seed(seed)
    if X.is_floating_point():
        return X + 0.1 * torch.randn(X.shape, generator=g, dtype=X.dtype), y
    return X.flip(0), y


def assert_operator_contract(make, model, data, reference, *, rtol: float = 1e-10, seed: int = 0) -> None:
    """The whole contract for ``make(model, data) -> operator`` against ``reference(model, data) -> dense``.

    Products and exports match the reference; ``op.at(theta)`` equals a fresh operator
    built at θ (and the reference there), leaves ``op`` as it was, and has the fresh
    operator's fingerprint; the fingerprint changes when the weights or the data change.
    """
    op = make(model, data)
    dense = reference(model, data)
    assert_operator_matches(op, dense, rtol=rtol, seed=seed)
    theta0 = op.objective.theta0
    g = torch.Generator().manual_seed(seed + 7)
    theta = theta0 + 0.1 * torch.randn(theta0.shape, generator=g, dtype=theta0.dtype)
    moved = op.at(theta)
    other = model_at(model, op.names, theta)
    fresh = make(other, data)
    assert type(moved) is type(op) and moved.engine == op.engine
    assert_operator_matches(moved, reference(other, data), rtol=rtol, seed=seed + 1)
    torch.testing.assert_close(moved.to_dense(), fresh.to_dense(), rtol=rtol, atol=rtol * float(dense.abs().max()))
    assert moved.fingerprint() == fresh.fingerprint() != op.fingerprint()
    torch.testing.assert_close(op.to_dense(), dense, rtol=rtol, atol=rtol * float(dense.abs().max()))
    assert make(model, _perturbed(data, seed)).fingerprint() != op.fingerprint()
    assert make(model, data).fingerprint() == op.fingerprint()
