"""Symmetric-log scales of the figures in ``_plots.py``: the linear range, the ticks and their labels.

Curvature values span decades on both sides of 0, so the heatmap and the eigenvalue plot
use a symmetric-log axis: linear within ``±linthresh``, logarithmic beyond.
"""

from __future__ import annotations

import math

import torch


def _symlog_threshold(values, floor_ratio: float = 1e-4) -> float:
    """Linear range of a symmetric-log axis: the 10th percentile of the non-zero |values|."""
    a = torch.as_tensor(values, dtype=torch.float64).abs().flatten()
    top = float(a.max()) if a.numel() else 0.0
    nz = a[a > 0]
    if top == 0 or nz.numel() == 0:
        return 1.0
    return max(float(torch.quantile(nz, 0.1)), top * floor_ratio)


def _symlog_ticks(linthresh: float, top: float) -> list:
    """0 and ±10^k for the decades between the linear range and the largest value.

    >>> _symlog_ticks(3e-4, 0.15)
    [-0.1, -0.01, -0.001, 0.0, 0.001, 0.01, 0.1]
    """
    lo, hi = math.ceil(math.log10(linthresh)), math.floor(math.log10(top))
    decades = [10.0**k for k in range(lo, hi + 1)]
    if len(decades) > 5:  # keep the axis readable
        decades = decades[:: -(-len(decades) // 5)]
    return [-d for d in decades[::-1]] + [0.0] + decades


def _side_ticks(linthresh: float, top: float) -> list:
    """Ticks for one side of a symmetric-log axis.

    Up to 5 decades in [linthresh, top], the largest kept; when no decade falls there,
    the side's extreme rounded down to one significant digit.

    >>> _side_ticks(1e-5, 3e-3)
    [1e-05, 0.0001, 0.001]
    >>> _side_ticks(1e-3, 4e-3)
    [0.001]
    >>> _side_ticks(2e-3, 4e-3)
    [0.004]
    """
    if top <= 0:
        return []
    lo, hi = math.ceil(math.log10(linthresh)), math.floor(math.log10(top))
    decades = [10.0**k for k in range(lo, hi + 1)]
    if len(decades) > 5:
        decades = decades[::-1][:: -(-len(decades) // 5)][::-1]
    if decades:
        return decades
    k = math.floor(math.log10(top))
    return [math.floor(top / 10.0**k) * 10.0**k]


def _tick_label(v: float) -> str:
    """``0``, ``10⁻³``-style decades as mathtext (with the sign), else ``4e-03``."""
    if v == 0:
        return "0"
    k = math.log10(abs(v))
    if abs(k - round(k)) < 1e-9:
        return f"${'-' if v < 0 else ''}10^{{{int(round(k))}}}$"
    return f"{v:.0e}"


def _wide_range(values, ratio: float = 100.0) -> bool:
    a = torch.as_tensor(values, dtype=torch.float64).abs().flatten()
    nz = a[a > 0]
    return bool(nz.numel()) and float(nz.max()) > ratio * float(torch.quantile(nz, 0.1))
