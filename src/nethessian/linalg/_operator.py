"""What every estimator accepts: anything square with ``@`` on ``(P,)`` and ``(P, k)``.

``as_operator`` wraps a curvature operator or a plain symmetric tensor in one
small adapter that

* validates the shape (2-D, square) and exposes ``size``, ``dtype``, ``device``;
* validates the vectors it is given (``_checks.check_vector``), once: the
  finiteness of a *product* is checked here only when the wrapped object does
  not check it itself (a ``CurvatureOperator`` does);
* counts matrix-vector products (a ``(P, k)`` product counts ``k``) and puts the
  product's number into every error a product raises;
* carries the wrapped operator's ``layout`` (a ``ParamLayout``) when it has one,
  so results can be keyed by parameter name without linalg knowing networks;
* has a ``fingerprint()`` of the matrix it stands for, which every checkpointed
  algorithm stores under ``"operator"`` so a checkpoint of another matrix is refused.

Non-convergence convention of ``nethessian.linalg``: a result that carries a
``converged`` flag (``EigenResult``, ``SolveResult``) is returned and a
``NotConvergedWarning`` is issued; a function that returns a bare tensor
(``inverse_hvp``) raises ``NotConvergedError`` with the full result attached.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

from .. import distributed
from .._checks import all_finite, as_seed, check_vector
from ..errors import InputError, NonFiniteError, NotConvergedWarning, NotSymmetricError

__all__ = ["NotConvergedWarning", "Operator", "as_operator", "check_symmetric", "make_generator"]


def _tensor_hash(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_of(base: Any) -> str:
    """sha256 hex of what ``base``'s products depend on.

    A base with a ``fingerprint()`` (a ``CurvatureOperator``) gives its own; a
    tensor is hashed by bytes, shape and dtype; any other object by its class
    name, shape, dtype and the tensors among its attributes.
    """
    own = getattr(base, "fingerprint", None)
    if callable(own) and not isinstance(base, torch.Tensor):
        return str(own())
    h = hashlib.sha256()
    if isinstance(base, torch.Tensor):
        _tensor_hash(h, base)
        return h.hexdigest()
    h.update(f"{type(base).__qualname__}|{tuple(base.shape)}|{base.dtype}|".encode())
    for name, value in sorted(vars(base).items()) if hasattr(base, "__dict__") else ():
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            _tensor_hash(h, value)
    return h.hexdigest()


class Operator:
    """Counting, checking adapter around a square linear operator."""

    def __init__(self, base: Any):
        if isinstance(base, Operator):
            base = base.base
        shape = tuple(getattr(base, "shape", ()))
        if len(shape) != 2:
            raise InputError(f"expected a square matrix or operator of shape (P, P), got shape {shape}")
        if shape[0] != shape[1]:
            raise InputError(f"the operator must be square, got shape {shape}")
        if isinstance(base, torch.Tensor):
            check_vector(base, shape[0], "the matrix")  # dense, real, floating point, finite
        self.base = base
        self.size = int(shape[0])
        self.shape = (self.size, self.size)
        self.dtype = base.dtype
        self.device = torch.device(base.device)
        layout = getattr(base, "layout", None)  # torch.Tensor.layout is torch.strided: not ours
        self.layout = None if isinstance(base, torch.Tensor) or isinstance(layout, torch.layout) else layout
        # a CurvatureOperator checks its own products (and names the batch); don't repeat it
        self._checks_itself = hasattr(base, "objective")
        self.num_matvecs = 0
        self._fingerprint: Optional[str] = None

    def fingerprint(self) -> str:
        """sha256 hex of the matrix (see ``fingerprint_of``), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.base)
        return self._fingerprint

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        step = self.num_matvecs + 1
        if not self._checks_itself:  # a CurvatureOperator validates its input itself
            check_vector(v, self.size, f"the vector of product {step}")
        v = v.to(device=self.device, dtype=self.dtype)
        k = 1 if v.ndim == 1 else v.shape[1]
        try:
            out = self.base @ v
        except NonFiniteError as exc:
            raise NonFiniteError(f"at matrix-vector product {step}: {exc}") from None
        self.num_matvecs += k
        if not self._checks_itself and not all_finite(out):
            raise NonFiniteError(
                f"matrix-vector product {step} returned NaN or Inf; the operator (model, loss "
                "or data) is not finite at this point")
        return out

    matmul = __matmul__


def as_operator(A: Any) -> Operator:
    """Wrap ``A`` (operator or tensor) for use by an estimator, with a fresh product count."""
    return Operator(A)


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator seeded with ``distributed.common_seed(seed)``.

    Random vectors are drawn on the CPU so every device sees the same ones, and
    the seed is the same on every rank (``seed=None`` is drawn on rank 0 and
    broadcast), so all ranks run the same iterations on the same numbers.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(distributed.common_seed(as_seed(seed))))
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
            + _distributed_hint())
    return rel


def _distributed_hint() -> str:
    if not distributed.is_active():
        return ""
    return (f". Under torch.distributed ({distributed.world_size()} ranks) an asymmetry also appears when "
            "the ranks multiply different vectors: a seed=None that was not drawn once and broadcast "
            "(nh.distributed.common_seed), or ranks holding different weights or data")
