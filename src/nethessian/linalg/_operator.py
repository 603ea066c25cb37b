"""What every estimator accepts: anything square with ``@`` on ``(P,)`` and ``(P, k)``.

``as_operator`` wraps a curvature operator or a plain symmetric tensor in one
small adapter that

* validates the shape (2-D, square) and exposes ``size``, ``dtype``, ``device``;
* counts matrix-vector products (a ``(P, k)`` product counts ``k``);
* refuses non-finite products with the product's number (and, when the wrapped
  operator says so, the batch that produced it);
* carries the wrapped operator's ``layout`` (a ``ParamLayout``) when it has one,
  so results can be keyed by parameter name without linalg knowing networks.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch

from .._checks import all_finite
from ..errors import InputError, NonFiniteError, NotSymmetricError

__all__ = ["LinearOperatorLike", "Operator", "as_operator", "check_symmetric", "make_generator"]


@runtime_checkable
class LinearOperatorLike(Protocol):
    shape: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor: ...


class Operator:
    """Counting, checking adapter around a square linear operator."""

    def __init__(self, base: Any):
        if isinstance(base, Operator):
            base = base.base
        shape = tuple(getattr(base, "shape", ()))
        if len(shape) != 2:
            raise InputError(
                f"expected a square matrix or operator of shape (P, P), got shape {shape}"
            )
        if shape[0] != shape[1]:
            raise InputError(f"the operator must be square, got shape {shape}")
        if isinstance(base, torch.Tensor):
            if not base.dtype.is_floating_point:
                raise InputError(f"matrix dtype {base.dtype} is not floating point; use .double()")
            if not torch.isfinite(base).all():
                raise NonFiniteError("the matrix contains NaN or Inf entries")
        self.base = base
        self.size = int(shape[0])
        self.shape = (self.size, self.size)
        self.dtype = base.dtype
        self.device = torch.device(base.device) if not isinstance(base.device, torch.device) else base.device
        layout = getattr(base, "layout", None)  # torch.Tensor.layout is torch.strided: not ours
        self.layout = None if isinstance(base, torch.Tensor) or isinstance(layout, torch.layout) else layout
        self.num_matvecs = 0

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if v.ndim not in (1, 2) or v.shape[0] != self.size:
            raise InputError(f"expected a vector of shape ({self.size},) or ({self.size}, k), got {tuple(v.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        k = 1 if v.ndim == 1 else v.shape[1]
        step = self.num_matvecs + 1
        try:
            out = self.base @ v
        except NonFiniteError as exc:
            raise NonFiniteError(f"at matrix-vector product {step}: {exc}") from None
        self.num_matvecs += k
        if not all_finite(out):
            raise NonFiniteError(
                f"matrix-vector product {step} returned NaN or Inf; the operator (model, loss "
                "or data) is not finite at this point"
            )
        return out

    matmul = __matmul__


def as_operator(A: Any) -> Operator:
    """Wrap ``A`` (operator or tensor) for use by an estimator, with a fresh product count."""
    return Operator(A)


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator: random vectors are drawn on the CPU so every device and rank sees the same ones."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def randn(op: Operator, *shape: int, generator: torch.Generator, dtype=None) -> torch.Tensor:
    """Standard normal draws on the CPU in float64, moved to the operator's device/dtype."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return x.to(device=op.device, dtype=dtype or op.dtype)


def rademacher(op: Operator, *shape: int, generator: torch.Generator, dtype=None) -> torch.Tensor:
    x = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
    return x.to(device=op.device, dtype=dtype or op.dtype)


def check_symmetric(op: Operator, generator: torch.Generator, *, rtol: Optional[float] = None) -> float:
    """Cheap symmetry test with 2 products: compare uᵀ(Av) with vᵀ(Au).

    Returns the relative asymmetry; raises ``NotSymmetricError`` above ``rtol``
    (default: 1e-3 in float32, 1e-8 in float64).
    """
    if rtol is None:
        rtol = 1e-8 if op.dtype == torch.float64 else 1e-3
    UV = randn(op, op.size, 2, generator=generator)
    A_UV = op @ UV
    u, v = UV[:, 0].double(), UV[:, 1].double()
    Au, Av = A_UV[:, 0].double(), A_UV[:, 1].double()
    a, b = torch.dot(u, Av), torch.dot(v, Au)
    scale = max(float(u.norm() * Av.norm()), float(v.norm() * Au.norm()), torch.finfo(torch.float64).tiny)
    rel = float((a - b).abs()) / scale
    if rel > rtol:
        raise NotSymmetricError(
            f"the operator is not symmetric: u·(A v) = {float(a):.6g} but v·(A u) = {float(b):.6g} "
            f"(relative difference {rel:.2e} > {rtol:.0e}); Lanczos and CG need a symmetric operator"
        )
    return rel
