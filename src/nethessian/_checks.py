"""Shared checks of user input and of results: vectors, counts, tolerances, seeds, finiteness.

Every public entry point validates its arguments through these, so the same bad
input gets the same clear message everywhere.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .errors import InputError, NonFiniteError

__all__ = ["all_finite", "as_float", "as_int", "as_seed", "check_vector"]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``, via min and max (several times cheaper than ``isfinite(t).all()``).

    >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())  # 2 transfers, not 3 more tensor calls


def check_vector(v, P: int, what: str = "the vector") -> None:
    """Refuse anything ``op @ v`` cannot take, with a message that says what to pass instead.

    A ``(P,)`` or ``(P, k)`` dense, real, floating-point, finite tensor on a real device.
    """
    if not isinstance(v, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor of shape ({P},) or ({P}, k), got {type(v).__name__}")
    if v.is_sparse or v.layout != torch.strided:
        raise InputError(f"{what} is a sparse tensor ({v.layout}); pass a dense one (v.to_dense())")
    if v.is_meta:
        raise InputError(f"{what} is on the meta device and holds no values; pass a real tensor")
    if v.is_complex():
        raise InputError(
            f"{what} is complex ({v.dtype}); the Hessian of a real cost acts on real vectors: "
            "apply it to the real and imaginary parts separately"
        )
    if not v.is_floating_point():
        raise InputError(f"{what} has dtype {v.dtype}; pass a floating-point tensor (v.float() or v.double())")
    if v.ndim not in (1, 2) or v.shape[0] != P:
        raise InputError(f"expected {what} of shape ({P},) or ({P}, k), got {tuple(v.shape)}")
    if not all_finite(v):
        raise NonFiniteError(f"{what} contains NaN or Inf")


def as_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    """``value`` as an ``int``, refusing strings, bools and non-whole floats (no silent truncation).

    >>> as_int("k", 5), as_int("k", 5.0)
    (5, 5)
    >>> as_int("num_matvecs", 2.7)
    Traceback (most recent call last):
    ...
    nethessian.errors.InputError: num_matvecs must be a whole number, got 2.7
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        raise InputError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
    if isinstance(value, torch.Tensor):
        value = value.item()
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise InputError(f"{name} must be a whole number, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")
    return value


def as_float(name: str, value, *, positive: bool = False, below: Optional[float] = None) -> float:
    """``value`` as a finite ``float``, refusing strings and bools.

    >>> as_float("tol", "1e-3")
    Traceback (most recent call last):
    ...
    nethessian.errors.InputError: tol must be a number, got '1e-3' (str); write 1e-3, not "1e-3"
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = f'; write {value}, not "{value}"' if isinstance(value, str) else ""
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__}){hint}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise InputError(f"{name} must be positive, got {value}")
    if below is not None and value >= below:
        raise InputError(f"{name} must be below {below}, got {value}")
    return value


def as_seed(seed) -> Optional[int]:
    """``None`` or a whole number (the seed of a ``torch.Generator``)."""
    if seed is None:
        return None
    seed = as_int("seed", seed)
    if not -(2**63) <= seed < 2**64:
        raise InputError(f"seed must fit in 64 bits (a torch.Generator seed), got {seed}")
    return seed
