"""Figures of curvature results: Hessian heatmap, eigenvalues, block traces, density, Taylor model.

Every function returns a ``matplotlib.figure.Figure`` drawn on the Agg canvas
without touching pyplot (no global backend or figure state is changed);
``save(fig, path)`` writes it and ``png_bytes(fig)`` gives the PNG for embedding.
matplotlib is imported inside the functions, so ``import nethessian`` stays light.

Colours follow one rule everywhere: red is positive curvature, blue negative
(a diverging map centred at 0). The symmetric-log scales and their ticks are in
``_plot_scales.py``.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
from typing import Mapping, Optional, Sequence, Tuple

import torch

from ._plot_scales import _side_ticks, _symlog_threshold, _symlog_ticks, _tick_label, _wide_range

__all__ = [
    "hessian_heatmap",
    "eigenvalue_plot",
    "block_trace_plot",
    "density_plot",
    "quadratic_plot",
    "save",
    "png_bytes",
    "POSITIVE",
    "NEGATIVE",
]

POSITIVE, NEGATIVE, INK = "#c0392b", "#2763b8", "#222222"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8.5)
    ax.grid(True, color="0.92", lw=0.8)
    ax.set_axisbelow(True)


def png_bytes(fig, dpi: int = 144) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save(fig, path, dpi: int = 144) -> pathlib.Path:
    """Write ``fig`` (format from the suffix, e.g. ``.png`` or ``.pdf``) and return the path."""
    path = pathlib.Path(os.fspath(path))
    fig.savefig(path, dpi=dpi)
    return path


def _entry_labels(layout) -> list:
    out = []
    for name, shape in zip(layout.names, layout.shapes):
        for idx in (
            torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist()
            if len(shape) > 1
            else [[i] for i in range(math.prod(shape))]
        ):
            out.append(f"{name}[{','.join(map(str, idx))}]")
    return out


def hessian_heatmap(
    H,
    *,
    block_labels: Optional[Mapping[Tuple[str, str], str]] = None,
    scale: str = "symlog",
    annotate: Optional[bool] = None,
    title: Optional[str] = None,
    caption: Optional[str] = None,
):
    """Heatmap of a ``BlockHessian`` with its parameter blocks outlined and named.

    Args:
        H: a ``BlockHessian`` (or anything with ``.dense`` and ``.layout``).
        block_labels: ``{(row name, col name): label}`` written in a corner of each
            block, e.g. ``{("W1", "W1"): "a", ("W1", "W2"): "b", ("W2", "W1"): "bᵀ", ("W2", "W2"): "c"}``.
        scale: ``"symlog"`` (default: small and large entries both visible) or ``"linear"``;
            either way a diverging map centred at 0 (red positive, blue negative).
        annotate: write each entry's value in its cell (default: when P ≤ 12).
        title: text above the matrix.
        caption: text below the matrix.
    """
    M = (0.5 * (H.dense + H.dense.T)).detach().double().cpu()
    lay, P = H.layout, M.shape[0]
    norm, ticks = _heatmap_norm(M, scale)
    small = P <= 24
    side = 6.4 if small else 6.8
    fig = _figure(side + 1.2, side + (0.5 if caption else 0.0))
    ax = fig.add_subplot()
    img = ax.imshow(M.numpy(), cmap="RdBu_r", norm=norm, interpolation="nearest" if P <= 200 else "antialiased")
    cb = fig.colorbar(img, ax=ax, shrink=0.78, pad=0.02, ticks=ticks)
    cb.set_label("∂²J/∂θᵢ∂θⱼ" + (" (symmetric log scale)" if scale == "symlog" else ""), fontsize=9)
    cb.ax.tick_params(labelsize=8)
    _block_axes(ax, lay, P, small)
    if annotate if annotate is not None else P <= 12:
        corners = {(lay.offsets[lay.index(r)], lay.offsets[lay.index(c)]) for r, c in (block_labels or {})}
        _annotate_cells(ax, M, norm, corners)
    for (r, c), label in (block_labels or {}).items():
        y0, x0 = lay.offsets[lay.index(r)] - 0.5, lay.offsets[lay.index(c)] - 0.5
        ax.text(
            x0 + 0.12,
            y0 + 0.12,
            label,
            ha="left",
            va="top",
            fontsize=12,
            fontweight="bold",
            color=INK,
            bbox=dict(boxstyle="round,pad=0.22", fc="white", ec=INK, lw=0.8, alpha=0.92),
        )
    if title:
        ax.set_title(title, fontsize=11, pad=8)
    if caption:
        fig.supxlabel(caption, fontsize=10.5)
    return fig


def _heatmap_norm(M: torch.Tensor, scale: str):
    """A diverging colour norm centred at 0 (and its colour-bar ticks for ``symlog``)."""
    from matplotlib.colors import Normalize, SymLogNorm

    m = float(M.abs().max()) or 1.0
    if scale == "symlog":
        lin = _symlog_threshold(M)
        return SymLogNorm(lin, vmin=-m, vmax=m, base=10), _symlog_ticks(lin, m)
    if scale == "linear":
        return Normalize(-m, m), None
    raise ValueError(f"scale must be 'symlog' or 'linear', got {scale!r}")


def _block_axes(ax, lay, P: int, small: bool) -> None:
    """Heavy lines between parameter blocks; entry names (small P) or block names as ticks."""
    for e in [o - 0.5 for o in lay.offsets[1:]]:
        ax.axhline(e, color=INK, lw=1.6)
        ax.axvline(e, color=INK, lw=1.6)
    if small:
        labels = _entry_labels(lay)
        ax.set_xticks(range(P), labels, rotation=90, fontsize=8, family="monospace")
        ax.set_yticks(range(P), labels, fontsize=8, family="monospace")
        ax.tick_params(length=0)
    else:
        centres = [o + n / 2 - 0.5 for o, n in zip(lay.offsets, lay.numels)]
        ax.set_xticks(centres, lay.names, rotation=45, ha="left", fontsize=8.5)
        ax.set_yticks(centres, lay.names, fontsize=8.5)
    ax.xaxis.tick_top()


def _annotate_cells(ax, M: torch.Tensor, norm, corners) -> None:
    """Each entry's value in its cell (moved down a little where a block label sits)."""
    P = M.shape[0]
    for i in range(P):
        for j in range(P):
            v = float(M[i, j])
            dark = abs(norm(v) - 0.5) > 0.32
            text = f"{v:+.4f}" if abs(v) >= 1e-4 or v == 0 else f"{v:+.0e}"
            ax.text(
                j,
                i + (0.2 if (i, j) in corners else 0.0),
                text,
                ha="center",
                va="center",
                fontsize=6.6,
                color="white" if dark else INK,
                family="monospace",
            )


def eigenvalue_plot(eigenvalues, *, smallest=None, title: Optional[str] = None, k_label: str = ""):
    """Eigenvalues as stems (symmetric log axis), red positive and blue negative.

    With ``smallest`` given, ``eigenvalues`` are the largest few and ``smallest`` the
    smallest few (matrix-free): the two ends are drawn side by side with a gap.
    """
    top = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten().sort().values
    from matplotlib.ticker import NullLocator

    low = None if smallest is None else torch.as_tensor(smallest, dtype=torch.float64).flatten().sort().values
    groups = [top] if low is None else [low, top]
    fig = _figure(7.6, 3.6)
    ax = fig.add_subplot()
    _style(ax)
    allv = torch.cat(groups)
    lin = _symlog_threshold(allv, 1e-6)
    x0, ticks, names = 1, [], []
    for gi, lam in enumerate(groups):
        xs = torch.arange(x0, x0 + lam.numel(), dtype=torch.float64)
        colours = [POSITIVE if v > 0 else NEGATIVE for v in lam.tolist()]
        if lam.numel() <= 80:
            ax.vlines(xs.numpy(), 0, lam.numpy(), colors=colours, lw=2.2)
            ax.scatter(xs.numpy(), lam.numpy(), c=colours, s=26, zorder=3, edgecolors="white", linewidths=0.6)
        else:
            ax.scatter(xs.numpy(), lam.numpy(), c=colours, s=6, zorder=3)
        if smallest is not None:
            ticks.append(float(xs.mean()))
            names.append(("smallest " if gi == 0 else "largest ") + k_label)
        x0 += lam.numel() + (2 if smallest is not None else 0)
    if smallest is not None:
        ax.axvline(groups[0].numel() + 1, color="0.6", ls=":", lw=1.2)
        ax.set_xticks(ticks, names, fontsize=9)
        ax.set_xlabel("Lanczos Ritz values (the middle of the spectrum is not computed)", fontsize=9)
    else:
        ax.set_xlabel("index (ascending)", fontsize=9)
        if allv.numel() <= 30:
            ax.set_xticks(range(1, allv.numel() + 1))
    ax.axhline(0, color=INK, lw=0.9)
    wide = _wide_range(allv)
    if wide:  # small eigenvalues stay visible next to the outliers
        ax.set_yscale("symlog", linthresh=lin)
        ticks = (
            [-t for t in _side_ticks(lin, float(-allv.min()))[::-1]] + [0.0] + _side_ticks(lin, float(allv.max()))
        )  # each side labelled on its own
        ax.set_yticks(ticks, [_tick_label(t) for t in ticks])
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_ylim(-1.4 * max(float(-allv.min()), lin), 1.4 * max(float(allv.max()), lin))
    ax.set_ylabel("eigenvalue λ" + (" (symmetric log scale)" if wide else ""), fontsize=9)
    ax.set_title(title or "eigenvalues of H", fontsize=10.5)
    return fig


def block_trace_plot(estimate, *, title: Optional[str] = None):
    """Horizontal bars of each diagonal block's trace, with ±1 standard error bars."""
    blocks = estimate.blocks or {"all": estimate}
    names = list(blocks)
    vals = [blocks[n].value for n in names]
    errs = [blocks[n].stderr for n in names]
    fig = _figure(7.6, 0.9 + 0.42 * max(len(names), 2))
    ax = fig.add_subplot()
    _style(ax)
    ax.grid(True, axis="x", color="0.92")
    ax.grid(False, axis="y")
    ys = list(range(len(names)))[::-1]
    colours = [POSITIVE if v >= 0 else NEGATIVE for v in vals]
    ax.barh(
        ys,
        vals,
        xerr=errs if any(errs) else None,
        color=colours,
        alpha=0.85,
        height=0.62,
        error_kw=dict(ecolor=INK, capsize=4, lw=1.2),
    )
    ax.set_yticks(ys, names, fontsize=9, family="monospace")
    ax.axvline(0, color=INK, lw=0.9)
    span = max(max(abs(v) + e for v, e in zip(vals, errs)), 1e-300)
    lo = min(0.0, min(v - e for v, e in zip(vals, errs)))
    hi = max(0.0, max(v + e for v, e in zip(vals, errs)))
    ax.set_xlim(lo - 0.05 * span * (lo < 0), hi + 0.3 * span)
    for y, v, e in zip(ys, vals, errs):
        txt = f"{v:.4g}" + (f" ± {e:.2g}" if e else "")
        end = max(v + e, 0.0)
        ax.text(end + 0.02 * span, y, txt, va="center", ha="left", fontsize=8.5, family="monospace")
    exact = estimate.method == "exact"
    ax.set_xlabel("trace of the diagonal block" + ("" if exact else " (error bars: ±1 standard error)"), fontsize=9)
    ax.set_title(
        title
        or f"tr H by parameter block: total {estimate.value:.5g}"
        + ("" if exact else f" ± {estimate.stderr:.2g}")
        + f" ({estimate.method})",
        fontsize=10.5,
    )
    return fig


def density_plot(density, *, eigenvalues=None, log: Optional[bool] = None, title: Optional[str] = None):
    """A ``SpectralDensity`` as a filled curve; exact eigenvalues (if given) as a rug below it.

    ``log`` (default: unless fewer than 50 exact eigenvalues are given) draws the density on a
    log axis, where the small bulk and the outliers of a Hessian spectrum both show.
    """
    grid, y = density.grid.double().numpy(), density.density.double().numpy()
    if log is None:
        log = eigenvalues is None or torch.as_tensor(eigenvalues).numel() >= 50
    fig = _figure(7.6, 3.6)
    ax = fig.add_subplot()
    _style(ax)
    floor = max(float(y.max()), 1e-300) * 1e-5 if log else 0.0
    yc = y.clip(min=floor) if log else y
    ax.fill_between(grid, floor, yc, color="#7f8fa6", alpha=0.35, lw=0)
    ax.plot(grid, yc, color=INK, lw=1.3)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor, top=float(y.max()) * 3)
    ax.axvline(0, color="0.55", lw=0.9, ls="--")
    if eigenvalues is not None:
        lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
        few = lam.numel() <= 50
        for v in lam.tolist():
            ax.axvline(
                v,
                ymin=0,
                ymax=0.06,
                color=POSITIVE if v > 0 else NEGATIVE,
                lw=1.6 if few else 0.5,
                alpha=1.0 if few else 0.5,
            )
    ax.set_xlabel("eigenvalue λ", fontsize=9)
    ax.set_ylabel("density" + (" (log)" if log else ""), fontsize=9)
    ax.set_title(title or "spectral density", fontsize=10.5)
    return fig


def quadratic_plot(comparisons: Sequence, titles: Optional[Sequence[str]] = None):
    """True cost ``J(θ + αd)`` against the model ``q(αd)``, one panel per direction.

    ``comparisons`` are ``QuadraticComparison`` objects (``alphas``, ``true``, ``model``, ``slope``).
    """
    n = len(comparisons)
    fig = _figure(3.0 * n + 1.0, 3.5)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for i, (ax, cmp) in enumerate(zip(axes, comparisons)):
        _style(ax)
        a = cmp.alphas.numpy()
        ax.plot(a, cmp.true.numpy(), color=INK, lw=2.0, label="true J(θ + αd)")
        ax.plot(a, cmp.model.numpy(), color="#e67e22", lw=2.0, ls="--", label="model q(αd)")
        ax.axvline(0.0, color="0.7", lw=0.8)
        ax.set_title(titles[i] if titles else f"{cmp.direction} direction", fontsize=9.5)
        ax.set_xlabel("step α along the unit direction d", fontsize=8.5)
        if i == 0:
            ax.set_ylabel("cost", fontsize=9)
            ax.legend(fontsize=8, frameon=False)
    return fig
