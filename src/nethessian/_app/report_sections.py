"""The report's numbers, section by section, from the library's estimators on one operator.

Dense mode (P ≤ ``dense_max_params``): the dense Hessian, all eigenvalues, the exact
trace by block (``trace(exact=True, by_block=True)`` on the formed matrix) and the
exact spectral density. Matrix-free mode: Lanczos extremes, Hutch++ by block, SLQ.
Both: the verdict and the quadratic model along three unit directions
(``QuadraticModel.compare`` on a grid symmetric about α = 0).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Tuple

import torch

from .report_more import lanczos_ncv

__all__ = ["COSTLY", "OFF_BY_DEFAULT", "compute", "alpha_grid", "is_dense"]

Figures = Dict[str, Callable[[], bytes]]


#: the sections whose numbers cost products; the others are always on the page
COSTLY = ("hessian", "eigenvalues", "trace", "density", "quadratic", "blocks", "eigenvectors", "ggn", "input-hessian")
#: the sections computed only when asked for by name (``sections=[..., "input-hessian"]``)
OFF_BY_DEFAULT = ("input-hessian",)
#: the sections that need the dense Hessian in dense mode
_NEED_H = set(COSTLY) - {"input-hessian"}


def is_dense(P: int, S: Dict[str, Any]) -> bool:
    """Dense mode: P ≤ dense_max_params (and always for P ≤ 2: Lanczos needs k < P)."""
    return P <= max(S["dense_max_params"], 2)


def compute(q, S: Dict[str, Any], stages, progress: bool, problem=None) -> Tuple[Dict[str, Any], Figures]:
    """Every chosen section's numbers (the JSON's content) and a function per figure (PNG bytes).

    ``S["sections"]`` names the sections to compute; a costly section left out spends no product.
    ``problem`` (the :class:`~nethessian._app.problem.Problem`) is needed by the GGN and
    input-Hessian sections and names the non-smooth modules behind a quadratic-model slope.
    """
    P, want = q.layout.size, set(S["sections"])
    dense = is_dense(P, S)
    R = _basics(q, dense)
    R["sections"] = list(S["sections"])
    part = _dense_part if dense else _matrix_free_part
    ctx: Dict[str, Any] = {}
    lam, top, trace, density, cond_note, figs = part(q, S, stages, progress, R, want, ctx)
    from .report_more import structure

    structure(q, S, stages, ctx, problem, R, want)
    R["verdict"] = _verdict(lam, q.gradient_norm, cond_note, dense) if "eigenvalues" in want else None
    R["trace"] = trace.to_dict() if trace is not None else None
    R["density"] = (
        None
        if density is None
        else {
            "method": "exact eigenvalues, Gaussian broadening" if dense else "stochastic Lanczos quadrature",
            "sigma": density.sigma,
            "num_probes": None if dense else S["density_probes"],
            "lanczos_steps": None if dense else min(S["lanczos_steps"], P),
            "num_matvecs": density.num_matvecs,
            "grid": density.grid.tolist(),
            "density": density.density.tolist(),
        }
    )
    R["quadratic"] = None
    if "quadratic" in want:
        lam_max = float(lam.max()) if lam is not None else None
        R["quadratic"], cmps, titles = stages("quadratic model", lambda: _quadratic(q, top, lam_max, S, problem))
        figs["quadratic"] = _figure("quadratic_plot", cmps, titles)
    figs.update(_common_figures(trace, density, lam if dense else None, S, P))
    return R, figs


def _verdict(lam, gradient_norm: float, cond_note: str, dense: bool) -> Dict[str, Any]:
    from .._verdict import classify_point

    verdict = classify_point(lam, gradient_norm)
    out = {
        **verdict.to_dict(),
        "condition_number_note": cond_note,
        "condition_number_is_lower_bound": (not dense) and "lower bound" in cond_note,
    }
    if not dense:
        out["message"] = f"from the {len(lam) // 2} smallest and largest eigenvalues: " + verdict.message
    return out


def _figure(name: str, *args, **kwargs) -> Callable[[], bytes]:
    """A deferred PNG of ``_plots.<name>(*args, **kwargs)`` (drawn on rank 0 only)."""

    def draw() -> bytes:
        from .. import _plots as plots

        return plots.png_bytes(getattr(plots, name)(*args, **kwargs))

    return draw


def _basics(q, dense: bool) -> Dict[str, Any]:
    lay, P = q.layout, q.layout.size
    g = lay.unflatten(q.gradient.detach().double().cpu())
    return {
        "mode": "dense" if dense else "matrix-free",
        "num_parameters": P,
        "parameters": [{"name": n, "shape": list(s), "numel": k} for n, s, k in zip(lay.names, lay.shapes, lay.numels)],
        "cost": q.value,
        "gradient_norm": q.gradient_norm,
        "gradient_norm_by_parameter": {n: float(t.norm()) for n, t in g.items()},
        "gradient": {n: t.tolist() for n, t in g.items()} if P <= 200 else None,
    }


class _Formed:
    """The formed dense Hessian as an operator (shape, dtype, device, layout, ``@``) for the estimators."""

    def __init__(self, H):
        self.dense, self.layout = H.symmetric().double(), H.layout
        self.shape, self.dtype, self.device = tuple(self.dense.shape), self.dense.dtype, self.dense.device

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        return self.dense @ V


def _dense_part(q, S, stages, progress, R, want, ctx):
    from .._dense import BlockHessian
    from ..linalg._trace import trace as trace_fn

    op, lay, P = q.operator, q.layout, q.layout.size
    R["hessian"], R["eigenvalues"], figs = None, None, {}
    if not want & _NEED_H:
        return None, None, None, None, "", figs
    H = stages("dense Hessian", lambda: BlockHessian(op.to_dense(progress=progress), lay))
    lam, vecs = stages("eigenvalues (dense)", lambda: torch.linalg.eigh(H.symmetric().double()))
    lam = lam.cpu()
    k = min(S["num_eigs"], P)
    ctx.update(H=H.symmetric().double(), top_values=lam.flip(0)[:k], top_vectors=vecs.flip(1)[:, :k])
    labels, defs = _block_letters(lay.names)
    if "hessian" in want:
        small = P <= 200
        R["hessian"] = {
            "asymmetry": H.asymmetry,
            "dense": H.symmetric().double().cpu().tolist() if small else None,
            "blocks": {
                k: {"of": d, "rows": r, "cols": c, "values": H[r, c].double().cpu().tolist()}
                for k, (r, c, d) in defs.items()
            }
            if small
            else None,
        }
        figs["heatmap"] = _figure(
            "hessian_heatmap",
            H,
            block_labels=labels,
            title=f"Hessian ∇²J(θ), {P} × {P}, by parameter block",
            caption="   ".join(f"{k} = {d}" for k, (_, _, d) in defs.items()) or None,
        )
    if "eigenvalues" in want:
        R["eigenvalues"] = {"method": "dense (torch.linalg.eigh)", "all": lam.tolist()}
        figs["eigenvalues"] = _figure("eigenvalue_plot", lam, title=f"all {P} eigenvalues of H (dense)")
    trace = (
        stages("trace (exact)", lambda: trace_fn(_Formed(H), exact=True, by_block=True)) if "trace" in want else None
    )
    density = exact_density(lam) if "density" in want else None
    top = vecs[:, -1].to(q.gradient)
    return lam, top, trace, density, "max|λ| / min|λ| over all eigenvalues", figs


def _matrix_free_part(q, S, stages, progress, R, want, ctx):
    from .._verdict import classify_point
    from ..linalg._density import spectral_density
    from ..linalg._trace import trace as trace_fn

    op, P = q.operator, q.layout.size
    k = min(S["num_eigs"], P - 1)
    R["hessian"], R["eigenvalues"], figs = None, None, {}
    lam = top = trace = density = None
    cond_note = ""
    if want & {"eigenvalues", "quadratic", "eigenvectors", "ggn"}:
        ncv = lanczos_ncv(S, k, P)
        hi = stages("largest eigenvalues (Lanczos)", lambda: _lanczos(op, k, "largest", S["seed"], progress, ncv))
        lam, top = hi.eigenvalues.cpu(), hi.eigenvectors[:, 0]
        ctx.update(top_values=hi.eigenvalues.cpu(), top_vectors=hi.eigenvectors)
    if "eigenvalues" in want:
        lo = stages("smallest eigenvalues (Lanczos)", lambda: _lanczos(op, k, "smallest", S["seed"], progress, ncv))
        lam = torch.cat([lo.eigenvalues, hi.eigenvalues]).cpu()
        R["eigenvalues"] = {"method": "thick-restart Lanczos", "largest": hi.to_dict(), "smallest": lo.to_dict()}
        v = classify_point(lam, q.gradient_norm)
        cond_note = (
            "λ_max / λ_min from the Lanczos extremes"
            if v.num_negative == 0 or v.num_positive == 0
            else "lower bound: max|λ| / min|λ| of the computed extremes; the eigenvalue nearest 0 "
            "is in the middle of the spectrum, which Lanczos did not compute"
        )
        figs["eigenvalues"] = _figure(
            "eigenvalue_plot",
            hi.eigenvalues,
            smallest=lo.eigenvalues,
            k_label=f"{k}",
            title=f"the {k} smallest and {k} largest eigenvalues of H (Lanczos)",
        )
    if "trace" in want:
        trace = stages(
            "trace (Hutch++)",
            lambda: trace_fn(
                op, method="hutch++", num_matvecs=S["trace_matvecs"], seed=S["seed"], by_block=True, progress=progress
            ),
        )
    if "density" in want:
        density = stages(
            "spectral density (SLQ)",
            lambda: spectral_density(
                op, num_probes=S["density_probes"], lanczos_steps=S["lanczos_steps"], seed=S["seed"], progress=progress
            ),
        )
    return lam, top, trace, density, cond_note, figs


def _common_figures(trace, density, exact_lam, S, P) -> Figures:
    figs = {}
    if trace is not None:
        figs["trace"] = _figure("block_trace_plot", trace)
    if density is not None:
        title = (
            "eigenvalue density (exact eigenvalues, Gaussian broadening σ = %.2g)" % density.sigma
            if exact_lam is not None
            else f"eigenvalue density (SLQ: {S['density_probes']} probes × {min(S['lanczos_steps'], P)} steps, "
            f"σ = {density.sigma:.2g})"
        )
        figs["density"] = _figure("density_plot", density, eigenvalues=exact_lam, title=title)
    return figs


def _lanczos(op, k, which, seed, progress, ncv):
    from ..linalg._lanczos import eigenvalues

    with warnings.catch_warnings():  # non-convergence is shown on the page (converged: False)
        warnings.simplefilter("ignore", UserWarning)
        return eigenvalues(op, k=k, which=which, tol=1e-3, seed=seed, progress=progress, ncv=ncv)


def _block_letters(names):
    """Two parameter tensors: the blocks a, b (and bᵀ), c of the classic two-layer derivation."""
    if len(names) != 2:
        return None, {}
    n1, n2 = names
    labels = {(n1, n1): "a", (n1, n2): "b", (n2, n1): "bᵀ", (n2, n2): "c"}
    defs = {"a": (n1, n1, f"∂²J/∂{n1}²"), "b": (n1, n2, f"∂²J/∂{n1}∂{n2}"), "c": (n2, n2, f"∂²J/∂{n2}²")}
    return labels, defs


def exact_density(lam: torch.Tensor, grid_size: int = 1000):
    """Every eigenvalue with weight 1/P, broadened like SLQ (σ = spread / 100).

    The linalg layer has no density of a known spectrum yet; this is its only copy.
    """
    from ..linalg._density import SpectralDensity

    lam = lam.double().cpu()
    spread, scale = float(lam.max() - lam.min()), float(lam.abs().max())
    sigma = spread / 100 if spread > 1e-8 * scale else (scale / 100 if scale > 0 else 0.01)
    grid = torch.linspace(float(lam.min()) - 5 * sigma, float(lam.max()) + 5 * sigma, grid_size, dtype=torch.float64)
    z = (grid[:, None] - lam[None, :]) / sigma
    dens = torch.exp(-0.5 * z.square()).mean(dim=1) / (sigma * math.sqrt(2 * math.pi))
    w = torch.full_like(lam, 1.0 / lam.numel())
    return SpectralDensity(grid, dens, lam[None, :], w[None, :], 0, sigma)


def alpha_grid(radius: float, half: int = 20) -> torch.Tensor:
    """``2·half + 1`` step sizes ``radius · i / half`` for ``i = −half … half``: symmetric, α = 0 exactly.

    Built from integers, so it does not depend on how a vectorised ``linspace`` rounds on this CPU.
    """
    return torch.arange(-half, half + 1, dtype=torch.float64) * (float(radius) / half)


def _quadratic(q, top: torch.Tensor, lam_max: float, S, problem=None):
    """J(θ + αd) against q(αd) along the top eigenvector, −g/‖g‖ and a random direction.

    gᵀd and dᵀHd are read off the model values ``compare`` returns (q is exactly quadratic in α):
    gᵀd = (q(r) − q(−r)) / 2r and dᵀHd = (q(r) + q(−r) − 2J) / r² at the grid's ends ±r.
    Each direction's slope comes with its reason (:func:`~nethessian._app.report_notes.slope_reason`).
    """
    from .report_notes import nonsmooth_modules, slope_reason

    kinks = nonsmooth_modules(problem.model, problem.loss_fn) if problem is not None else []
    eps = torch.finfo(q.objective.dtype).eps
    radius = S["quadratic_radius"]
    if radius is None:
        radius = math.sqrt(2 * abs(q.value) / lam_max) if lam_max and lam_max > 0 and q.value != 0 else 1.0
        radius = min(max(radius, 1e-3), 10.0)
    alphas = alpha_grid(radius)
    dirs = [("top-eigenvector", top / top.double().norm().to(top.dtype), f"top eigenvector (λ = {lam_max:.4g})")]
    if q.gradient_norm > 0:
        dirs.append(("gradient", q.direction("gradient"), "steepest descent −g/‖g‖"))
    dirs.append(("random", q.direction("random", seed=S["seed"]), f"random unit direction (seed {S['seed']})"))
    cmps, out = [], []
    for name, d, label in dirs:
        c = q.compare(d, alphas)
        cmps.append(c)
        lo, hi, r = float(c.model[0]), float(c.model[-1]), float(alphas[-1])
        out.append(
            {
                "direction": name,
                "label": label,
                "g_dot_d": (hi - lo) / (2 * r),
                "curvature_dHd": (hi + lo - 2 * q.value) / r**2,
                "slope": c.slope,
                "alphas": c.alphas.tolist(),
                "true": c.true.tolist(),
                "model": c.model.tolist(),
            }
        )
        out[-1]["slope_reason"] = slope_reason(out[-1], q.value, eps, kinks)
    return {"radius": radius, "cost": q.value, "directions": out}, cmps, [d[2] for d in dirs]
