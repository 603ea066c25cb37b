"""Test helpers: small matrices with known spectra and operators that misbehave on purpose."""

from __future__ import annotations

import torch

from contract import assert_operator_matches  # noqa: F401 - the one comparison, re-exported


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
