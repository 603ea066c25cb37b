"""The one comparison helper every operator test uses."""
from __future__ import annotations

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
    torch.testing.assert_close(op @ v, dense @ v, rtol=rtol, atol=atol * P ** 0.5)
    HV = op @ V
    torch.testing.assert_close(HV, dense @ V, rtol=rtol, atol=atol * P ** 0.5)
    for j in range(V.shape[1]):  # a matrix product equals its columns
        torch.testing.assert_close(HV[:, j], op @ V[:, j], rtol=rtol, atol=atol * P ** 0.5)
    torch.testing.assert_close(op.to_dense(), dense, rtol=rtol, atol=atol)
    S = op.to_scipy()
    x = np.random.default_rng(seed).standard_normal(P)
    np.testing.assert_allclose(S @ x, dense.numpy() @ x, rtol=rtol, atol=atol * P ** 0.5 * np.abs(x).max())
    Xm = np.random.default_rng(seed + 1).standard_normal((P, 3))
    np.testing.assert_allclose(S.matmat(Xm), dense.numpy() @ Xm, rtol=rtol,
                               atol=atol * P ** 0.5 * np.abs(Xm).max())
    D = op.to_dense()
    assert float((D - D.T).abs().max()) <= 1e3 * torch.finfo(D.dtype).eps * scale


def sym(eigenvalues, seed=0, dtype=torch.float64) -> torch.Tensor:
    """Q diag(λ) Qᵀ with a random orthogonal Q: a symmetric matrix with a known spectrum."""
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    return ((Q * lam) @ Q.T).to(dtype)


class Blocked:
    """The smallest operator: shape, dtype, device, an optional parameter layout, and ``@``."""

    def __init__(self, M, layout=None):
        self.M, self.layout = M, layout
        self.shape, self.dtype, self.device = tuple(M.shape), M.dtype, M.device

    def __matmul__(self, v):
        return self.M @ v


class CrashAfter(Blocked):
    """Simulates a killed process: raises once more than ``n`` columns were multiplied."""

    def __init__(self, M, n):
        super().__init__(M)
        self.n, self.columns = n, 0

    def __matmul__(self, v):
        self.columns += 1 if v.ndim == 1 else v.shape[1]
        if self.columns > self.n:
            raise KeyboardInterrupt("simulated crash")
        return self.M @ v


class NaNAfter(Blocked):
    """Returns NaN from product call ``n`` on."""

    def __init__(self, M, n):
        super().__init__(M)
        self.n, self.calls = n, 0

    def __matmul__(self, v):
        self.calls += 1
        return self.M @ v * (float("nan") if self.calls >= self.n else 1.0)
