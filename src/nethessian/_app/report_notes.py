"""The report's one-line explanations: why the quadratic-model slope is not 3, and what the reduction is.

The slope of ``log|J(θ + αd) − q(αd)|`` against ``log|α|`` is 3 for a cost with three
continuous derivatives at small enough α (4 where the cubic term vanishes along d).
When it is not, :func:`slope_reason` names the cause found *in the data*:

* ``kinks`` — the model (or loss) has a module whose second derivative jumps
  (ReLU, LeakyReLU, max pooling, hard activations, ELU, L1/Huber losses): past a kink
  at distance δ the model's error grows like (α − δ)², a slope near 2;
* ``rounding`` — at the smallest steps the difference is within ``ROUNDING_FACTOR``
  of the float rounding of J (``u·|J|``, u the unit roundoff of the cost's dtype),
  so rounding noise flattens the small-α end;
* ``step range`` — at the largest steps the local slope is far from 3: higher-order
  terms dominate, the steps leave the region where the cubic term leads.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn

__all__ = ["NONSMOOTH", "ROUNDING_FACTOR", "nonsmooth_modules", "reduction_text", "slope_reason"]

NONSMOOTH = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.MultiMarginLoss,
    nn.MarginRankingLoss,
    nn.HingeEmbeddingLoss,
)
#: the smallest-step difference within this factor of u·|J| counts as rounding-limited
ROUNDING_FACTOR = 1e4
#: a slope within this of 3 (or 4) needs no explanation
TOLERANCE = 0.25


def nonsmooth_modules(model, loss_fn=None) -> List[str]:
    """``"name (Type)"`` of each module of the model (and the loss) whose second derivative jumps.

    Functional calls (``F.relu`` inside ``forward``) are not modules and are not seen.
    """
    found = [f"{n or 'model'} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, NONSMOOTH)]
    if isinstance(loss_fn, NONSMOOTH):
        found.append(f"loss ({type(loss_fn).__name__})")
    return found


def _local_slopes(alphas: torch.Tensor, diff: torch.Tensor, floor: float) -> tuple:
    """Slope between the two smallest and between the two largest |α| above ``floor`` (averaged over ±α)."""
    ends = []
    for sign in (1.0, -1.0):
        keep = (alphas * sign > 0) & (diff.abs() > floor)
        a, d = (alphas[keep] * sign).log(), diff[keep].abs().log()
        order = a.argsort()
        a, d = a[order], d[order]
        if a.numel() >= 2:
            ends.append((float((d[1] - d[0]) / (a[1] - a[0])), float((d[-1] - d[-2]) / (a[-1] - a[-2]))))
    if not ends:
        return math.nan, math.nan
    return sum(e[0] for e in ends) / len(ends), sum(e[1] for e in ends) / len(ends)


def slope_reason(c: Dict[str, Any], value: float, eps: float, kinks: List[str]) -> Dict[str, Any]:
    """Why the slope of one direction is what it is: ``{"cause", "text", "small_end", "large_end", ...}``.

    Args:
        c: the direction's ``alphas``, ``true``, ``model`` (lists) and ``slope``.
        value: J at θ.
        eps: the unit roundoff of the cost's dtype.
        kinks: :func:`nonsmooth_modules`.
    """
    alphas = torch.tensor(c["alphas"], dtype=torch.float64)
    diff = torch.tensor(c["true"], dtype=torch.float64) - torch.tensor(c["model"], dtype=torch.float64)
    rounding = eps * max(abs(value), 1e-300)
    small, large = _local_slopes(alphas, diff, 1e3 * rounding)
    used = diff.abs()[(alphas != 0) & (diff.abs() > 1e3 * rounding)]
    closest = float(used.min()) / rounding if used.numel() else math.nan
    facts = {"small_end": small, "large_end": large, "smallest_difference_over_rounding": closest}
    s = c["slope"]
    if not math.isfinite(s):
        return {
            **facts,
            "cause": "rounding",
            "text": "every difference is at the float rounding of J "
            f"(u·|J| = {rounding:.2g}): the model is exact to rounding along this direction",
        }
    if min(abs(s - 3), abs(s - 4)) <= TOLERANCE:
        return {
            **facts,
            "cause": None,
            "text": "as expected for a smooth cost"
            + (" (≈ 4: the cubic term vanishes along d)" if abs(s - 4) < abs(s - 3) else ""),
        }
    if kinks and (s < 3 or small < 3 - 2 * TOLERANCE):  # a kink shows as a slope near 2 at small steps
        return {
            **facts,
            "cause": "kinks",
            "text": f"non-smooth model: {', '.join(kinks[:3])}"
            + (f" and {len(kinks) - 3} more" if len(kinks) > 3 else "")
            + " — past a kink the error grows like α², a slope near 2",
        }
    if closest < ROUNDING_FACTOR and abs(small - 3) > TOLERANCE:
        return {
            **facts,
            "cause": "rounding",
            "text": f"float rounding: the smallest-step differences are "
            f"{closest:.3g} × u·|J| (u·|J| = {rounding:.2g}), local slope {small:.2f} there",
        }
    if math.isfinite(large) and abs(large - 3) > TOLERANCE:
        return {
            **facts,
            "cause": "step range",
            "text": f"the largest steps leave the quadratic regime: "
            f"local slope {large:.2f} at the largest |α| (higher-order terms), {small:.2f} at the smallest",
        }
    return {
        **facts,
        "cause": "unknown",
        "text": "no kink, rounding or step-range cause found (local slopes "
        f"{small:.2f} at the smallest and {large:.2f} at the largest steps)"
        + ("; functional activations (F.relu) are not seen" if not kinks else ""),
    }


def reduction_text(reduction, loss_fn) -> str:
    """What combines the batches: the reduction named, or what is used when none is known."""
    if reduction is None:
        what = "the model's own loss" if loss_fn is None else "a plain function"
        return f"none known ({what}): one batch, its value as returned"
    if callable(reduction):
        return (
            f"a callable term count ({getattr(reduction, '__name__', type(reduction).__name__)}): "
            "batches weighted by the terms it counts"
        )
    source = "inferred from the loss's .reduction" if getattr(loss_fn, "reduction", None) == reduction else "given"
    return f"{reduction} ({source})"
