"""What the curvature says about a point: minimum, saddle, or neither."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Verdict", "classify_point"]


@dataclass(frozen=True)
class Verdict:
    kind: str  # "minimum" | "maximum" | "saddle" | "degenerate" | "not stationary"
    message: str
    num_negative: int
    num_positive: int
    num_zero: int
    condition_number: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def classify_point(eigenvalues: torch.Tensor, grad_norm: float, *, rtol: float = 1e-8, gtol: float = 1e-6) -> Verdict:
    """Second-order test at θ from the Hessian's eigenvalues and the gradient norm.

    An eigenvalue counts as zero when ``|λ| ≤ rtol · max|λ|``. θ is a stationary
    point when ``‖g‖ ≤ gtol``; only then can it be a minimum or a saddle.

    >>> classify_point(torch.tensor([1.0, 2.0]), 0.0).kind
    'minimum'
    >>> classify_point(torch.tensor([-1.0, 2.0]), 0.0).kind
    'saddle'
    >>> classify_point(torch.tensor([1.0, 2.0]), 0.5).kind
    'not stationary'
    """
    lam = eigenvalues.double().flatten()
    scale = float(lam.abs().max()) if lam.numel() else 0.0
    tiny = rtol * scale
    neg, pos = int((lam < -tiny).sum()), int((lam > tiny).sum())
    zero = lam.numel() - neg - pos
    nonzero = lam.abs()[lam.abs() > tiny]
    cond = float(nonzero.max() / nonzero.min()) if nonzero.numel() and zero == 0 else float("inf")
    curv = f"{neg} negative, {pos} positive, {zero} ~zero eigenvalue(s)"
    if grad_norm > gtol:
        shape = (
            "positive definite (locally convex)"
            if neg == 0 and zero == 0
            else "indefinite (saddle-shaped)"
            if neg and pos
            else "negative definite"
            if pos == 0 and zero == 0
            else "semi-definite"
        )
        kind, msg = (
            "not stationary",
            (f"neither: θ is not a stationary point (‖g‖ = {grad_norm:.3g}); the curvature here is {shape}: {curv}"),
        )
    elif zero:
        kind, msg = "degenerate", f"stationary, but the second-order test is inconclusive: {curv}"
    elif neg and pos:
        kind, msg = "saddle", f"a saddle point: {curv}"
    elif neg:
        kind, msg = "maximum", f"a local maximum: all {neg} eigenvalues negative"
    else:
        kind, msg = "minimum", f"a strict local minimum: all {pos} eigenvalues positive"
    return Verdict(kind, msg, neg, pos, zero, cond)
