"""One self-contained HTML page (and a JSON file of the same numbers) about a cost's curvature.

``build_report`` computes, at the model's current parameters: J, the gradient, the
Hessian (dense, drawn as a heatmap by parameter block, when P ≤ ``dense_max_params``),
its eigenvalues and the minimum / saddle / not-stationary verdict, the condition
number, the trace (exact, or Hutch++ with a standard error) per parameter block,
the spectral density (exact, or stochastic Lanczos quadrature), the quadratic
model along the top eigenvector, the gradient and a random direction, and every
setting and version needed to rerun it. Above the size threshold only
matrix-free methods run, and the page says so. The page has no external asset:
figures are base64 PNG data URIs, the CSS is inline.

Every process computes (the products all-reduce); only rank 0 writes files.
"""
from __future__ import annotations

import base64
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .. import distributed as dist
from ..errors import InputError
from .report_html import SECTIONS, render_page

__all__ = ["ReportPaths", "SECTIONS", "build_report"]


@dataclass(frozen=True)
class ReportPaths:
    """Where the report went: the HTML page and the JSON file (written on rank 0 only)."""

    html: pathlib.Path
    json: pathlib.Path


def build_report(model, loss_fn, data, out_dir, *, params: Optional[Sequence[str]] = None, seed: int = 0,
                 title: str = "nethessian report", dense_max_params: int = 2000, num_eigs: int = 5,
                 trace_matvecs: int = 90, density_probes: int = 8, lanczos_steps: int = 80,
                 problem_name: Optional[str] = None, quadratic_radius: Optional[float] = None,
                 progress: bool = False) -> ReportPaths:
    """Compute the curvature summary of J at the current parameters; write ``report.html`` and ``report.json``.

    Args:
        model, loss_fn, data, params: the problem (see :class:`~nethessian.Objective`).
        out_dir: folder for the two files (created if missing).
        seed: seed of every random draw (Lanczos start, trace and density probes, random direction).
        title, problem_name: the page title, and a one-line name of the problem.
        dense_max_params: form the dense P × P Hessian when P is at most this; above it
            every section is matrix-free (Lanczos, Hutch++, SLQ).
        num_eigs: matrix-free: this many largest and this many smallest eigenvalues.
        trace_matvecs: matrix-free: the Hutch++ product budget.
        density_probes, lanczos_steps: matrix-free: SLQ probes, and Lanczos steps per probe.
        quadratic_radius: largest |α| of the quadratic-model plot (default: where
            ½ λ_max α² reaches J, clipped to [1e-3, 10]).
        progress: stage names and progress bars on stderr (rank 0).

    Returns:
        ``ReportPaths(html, json)`` (the same on every rank; the files exist on rank 0).

    Raises:
        InputError: the output folder cannot be written, or a setting is not a positive integer.
    """
    from .._quadratic import QuadraticModel

    for name, v in (("dense_max_params", dense_max_params), ("num_eigs", num_eigs),
                    ("trace_matvecs", trace_matvecs), ("density_probes", density_probes),
                    ("lanczos_steps", lanczos_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "dense_max_params" else 1):
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    out = pathlib.Path(os.fspath(out_dir)).expanduser()
    problem = _output_problem(out) if dist.is_main() else None
    stages = _Stages(progress and dist.is_main())
    q = stages("objective and gradient", lambda: QuadraticModel(model, loss_fn, data, params))
    _raise_together(problem, out, q.objective.device)
    S = dict(seed=seed, dense_max_params=dense_max_params, num_eigs=num_eigs, trace_matvecs=trace_matvecs,
             density_probes=density_probes, lanczos_steps=lanczos_steps,
             quadratic_radius=quadratic_radius, params=None if params is None else list(params))
    R, figs = _compute(q, S, stages, progress and dist.is_main())
    R["title"], R["problem"] = title, _problem(model, loss_fn, problem_name)
    R["settings"] = {**S, **_run_settings(q, model)}
    R["versions"] = _versions()
    R["timings_s"] = stages.times
    paths = ReportPaths(out / "report.html", out / "report.json")
    if dist.is_main():
        images = {k: _data_uri(fn()) for k, fn in figs.items()}
        paths.json.write_text(json.dumps(_jsonable(R), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        paths.html.write_text(render_page(R, images), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- output folder
def _output_problem(out: pathlib.Path) -> Optional[str]:
    """Why ``out`` cannot take the report (``None`` when it can): created, then probed by a write."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nethessian-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return (f"cannot write the report to {str(out)!r}: {exc.strerror or exc}. Pass an out_dir "
                "you can write to (a new folder is created), or fix the folder's permissions")
    return None


def _raise_together(problem: Optional[str], out: pathlib.Path, device) -> None:
    """Rank 0 checked the folder; every rank raises if it failed, so none waits in a collective."""
    bad = 1.0 if problem else 0.0
    if dist.is_active():
        bad, _ = dist.reduce_sum(torch.tensor([bad], dtype=torch.float64, device=device), 0.0)
        bad = float(bad[0])
    if bad:
        raise InputError(problem or f"rank 0 cannot write the report to {str(out)!r}; see rank 0's error")


class _Stages:
    """Run named stages, time them, and say their names on stderr when asked."""

    def __init__(self, verbose: bool):
        self.verbose, self.times = verbose, {}

    def __call__(self, name: str, fn: Callable[[], Any]):
        if self.verbose:
            print(f"nethessian report: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.times[name] = round(time.perf_counter() - t0, 4)
        return out


# ----------------------------------------------------------------------------- computation
def _compute(q, S: Dict[str, Any], stages: _Stages, progress: bool):
    from .. import _plots as plots
    from .._dense import BlockHessian
    from .._verdict import classify_point

    op, lay = q.operator, q.layout
    P, gn = lay.size, q.gradient_norm
    dense = P <= max(S["dense_max_params"], 2)  # Lanczos needs k < P: a 1- or 2-parameter problem is dense
    g = lay.unflatten(q.gradient.detach().double().cpu())
    R: Dict[str, Any] = {
        "mode": "dense" if dense else "matrix-free", "num_parameters": P,
        "parameters": [{"name": n, "shape": list(s), "numel": k} for n, s, k in zip(lay.names, lay.shapes, lay.numels)],
        "cost": q.value, "gradient_norm": gn,
        "gradient_norm_by_parameter": {n: float(t.norm()) for n, t in g.items()},
        "gradient": {n: t.tolist() for n, t in g.items()} if P <= 200 else None,
    }
    figs: Dict[str, Callable] = {}
    if dense:
        H = stages("dense Hessian", lambda: BlockHessian(op.to_dense(progress=progress), lay))
        lam, vecs = stages("eigenvalues (dense)", lambda: torch.linalg.eigh(H.symmetric().double()))
        lam = lam.cpu()
        labels, defs = _block_letters(lay.names)
        R["hessian"] = {"asymmetry": H.asymmetry,
                        "dense": H.symmetric().double().cpu().tolist() if P <= 200 else None,
                        "blocks": {k: {"of": d, "rows": r, "cols": c, "values": H[r, c].double().cpu().tolist()}
                                   for k, (r, c, d) in defs.items()} if P <= 200 else None}
        R["eigenvalues"] = {"method": "dense (torch.linalg.eigh)", "all": lam.tolist()}
        verdict = classify_point(lam, gn)
        cond_note = "max|λ| / min|λ| over all eigenvalues"
        top = vecs[:, -1].to(q.gradient)
        trace = _exact_trace(H, P)
        density = _exact_density(lam)
        figs["heatmap"] = lambda: plots.png_bytes(plots.hessian_heatmap(
            H, block_labels=labels, title=f"Hessian ∇²J(θ), {P} × {P}, by parameter block",
            caption="   ".join(f"{k} = {d}" for k, (_, _, d) in defs.items()) or None))
        figs["eigenvalues"] = lambda: plots.png_bytes(plots.eigenvalue_plot(
            lam, title=f"all {P} eigenvalues of H (dense)"))
    else:
        k = min(S["num_eigs"], P - 1)
        R["hessian"] = None
        hi = stages("largest eigenvalues (Lanczos)", lambda: _lanczos(op, k, "largest", S["seed"], progress))
        lo = stages("smallest eigenvalues (Lanczos)", lambda: _lanczos(op, k, "smallest", S["seed"], progress))
        lam = torch.cat([lo.eigenvalues, hi.eigenvalues]).cpu()
        R["eigenvalues"] = {"method": "thick-restart Lanczos", "largest": hi.to_dict(), "smallest": lo.to_dict()}
        verdict = classify_point(lam, gn)
        definite = verdict.num_negative == 0 or verdict.num_positive == 0
        cond_note = ("λ_max / λ_min from the Lanczos extremes" if definite else
                     "lower bound: max|λ| / min|λ| of the computed extremes; the eigenvalue nearest 0 "
                     "is in the middle of the spectrum, which Lanczos did not compute")
        top = hi.eigenvectors[:, 0]
        from ..linalg._trace import trace as trace_fn
        from ..linalg._density import spectral_density
        trace = stages("trace (Hutch++)", lambda: trace_fn(op, method="hutch++", num_matvecs=S["trace_matvecs"],
                                                           seed=S["seed"], by_block=True, progress=progress))
        density = stages("spectral density (SLQ)", lambda: spectral_density(
            op, num_probes=S["density_probes"], lanczos_steps=S["lanczos_steps"], seed=S["seed"], progress=progress))
        figs["eigenvalues"] = lambda: plots.png_bytes(plots.eigenvalue_plot(
            hi.eigenvalues, smallest=lo.eigenvalues, k_label=f"{k}",
            title=f"the {k} smallest and {k} largest eigenvalues of H (Lanczos)"))
    R["verdict"] = {**verdict.to_dict(), "condition_number_note": cond_note,
                    "condition_number_is_lower_bound": (not dense) and "lower bound" in cond_note}
    if not dense:
        R["verdict"]["message"] = f"from the {len(lam) // 2} smallest and largest eigenvalues: " + verdict.message
    R["trace"] = trace.to_dict()
    R["density"] = {"method": "exact eigenvalues, Gaussian broadening" if dense else "stochastic Lanczos quadrature",
                    "sigma": density.sigma, "num_probes": None if dense else S["density_probes"],
                    "lanczos_steps": None if dense else min(S["lanczos_steps"], P),
                    "num_matvecs": density.num_matvecs, "grid": density.grid.tolist(),
                    "density": density.density.tolist()}
    R["quadratic"], cmps, titles = stages("quadratic model", lambda: _quadratic(q, top, float(lam.max()), S))
    figs["trace"] = lambda: plots.png_bytes(plots.block_trace_plot(trace))
    figs["density"] = lambda: plots.png_bytes(plots.density_plot(
        density, eigenvalues=lam if dense else None,
        title="eigenvalue density (exact eigenvalues, Gaussian broadening σ = %.2g)" % density.sigma if dense else
        f"eigenvalue density (SLQ: {S['density_probes']} probes × {min(S['lanczos_steps'], P)} steps, "
        f"σ = {density.sigma:.2g})"))
    figs["quadratic"] = lambda: plots.png_bytes(plots.quadratic_plot(cmps, titles))
    return R, figs


def _lanczos(op, k, which, seed, progress):
    from ..linalg._lanczos import eigenvalues

    with warnings.catch_warnings():  # non-convergence is shown on the page (converged: False)
        warnings.simplefilter("ignore", UserWarning)
        return eigenvalues(op, k=k, which=which, tol=1e-3, seed=seed, progress=progress)


def _block_letters(names):
    """Two parameter tensors: the blocks a, b (and bᵀ), c of the classic two-layer derivation."""
    if len(names) != 2:
        return None, {}
    n1, n2 = names
    labels = {(n1, n1): "a", (n1, n2): "b", (n2, n1): "bᵀ", (n2, n2): "c"}
    defs = {"a": (n1, n1, f"∂²J/∂{n1}²"), "b": (n1, n2, f"∂²J/∂{n1}∂{n2}"), "c": (n2, n2, f"∂²J/∂{n2}²")}
    return labels, defs


def _exact_trace(H, P: int):
    from ..linalg._trace import TraceEstimate

    blocks = {n: TraceEstimate(float(torch.trace(H[n].double())), 0.0, P, "exact") for n in H.names}
    return TraceEstimate(float(torch.trace(H.dense.double())), 0.0, P, "exact", blocks)


def _exact_density(lam: torch.Tensor, grid_size: int = 1000):
    """Every eigenvalue with weight 1/P, broadened like SLQ (σ = spread / 100)."""
    from ..linalg._density import SpectralDensity

    lam = lam.double().cpu()
    spread, scale = float(lam.max() - lam.min()), float(lam.abs().max())
    sigma = spread / 100 if spread > 1e-8 * scale else (scale / 100 if scale > 0 else 0.01)
    grid = torch.linspace(float(lam.min()) - 5 * sigma, float(lam.max()) + 5 * sigma, grid_size, dtype=torch.float64)
    z = (grid[:, None] - lam[None, :]) / sigma
    dens = torch.exp(-0.5 * z.square()).mean(dim=1) / (sigma * math.sqrt(2 * math.pi))
    w = torch.full_like(lam, 1.0 / lam.numel())
    return SpectralDensity(grid, dens, lam[None, :], w[None, :], 0, sigma)


def _quadratic(q, top: torch.Tensor, lam_max: float, S):
    radius = S["quadratic_radius"]
    if radius is None:
        radius = math.sqrt(2 * abs(q.value) / lam_max) if lam_max > 0 and q.value != 0 else 1.0
        radius = min(max(radius, 1e-3), 10.0)
    alphas = torch.linspace(-radius, radius, 41, dtype=torch.float64)
    dirs = [("top-eigenvector", top / top.double().norm().to(top.dtype), f"top eigenvector (λ = {lam_max:.4g})")]
    if q.gradient_norm > 0:
        dirs.append(("gradient", q.direction("gradient"), "steepest descent −g/‖g‖"))
    dirs.append(("random", q.direction("random", seed=S["seed"]), f"random unit direction (seed {S['seed']})"))
    cmps, out = [], []
    for name, d, label in dirs:
        c = q.compare(d, alphas)
        cmps.append(c)
        gd = float(torch.dot(q.gradient.double(), d.double()))
        dHd = float(torch.dot(d.double(), (q.operator @ d).double()))
        out.append({"direction": name, "label": label, "g_dot_d": gd, "curvature_dHd": dHd, "slope": c.slope,
            "alphas": c.alphas.tolist(), "true": c.true.tolist(), "model": c.model.tolist()})
    return {"radius": radius, "cost": q.value, "directions": out}, cmps, [d[2] for d in dirs]


# ----------------------------------------------------------------------------- context
def _problem(model, loss_fn, name: Optional[str]) -> Dict[str, Any]:
    from ..examples import TwoLayerNet

    if isinstance(model, TwoLayerNet):
        return {"name": name or "the two-layer 2-3-1 sigmoid network (sleep, study → test score)",
                "description": "ŷ = f(f(X W1) W2) with f the sigmoid and no biases; J = ½ Σₙ (yₙ − ŷₙ)². "
                               "X = hours of (sleep, study) of 3 students, each column divided by its "
                               "maximum; y = test scores / 100. W1 is 2×3 and W2 is 3×1: θ has 9 entries.",
                "model": type(model).__name__, "loss": type(loss_fn).__name__, "model_repr": repr(model)}
    loss = type(loss_fn).__name__ if not callable(loss_fn) or hasattr(loss_fn, "forward") else \
        getattr(loss_fn, "__name__", type(loss_fn).__name__)
    return {"name": name or f"{type(model).__name__} with {loss}", "description": None,
            "model": type(model).__name__, "loss": loss, "model_repr": repr(model)}


def _run_settings(q, model) -> Dict[str, Any]:
    obj = q.objective
    samples, batches = 0.0, 0.0
    for b in obj.data:
        samples += float(b.targets.shape[0]) if b.targets.ndim else 1.0
        batches += 1.0
    if dist.is_active():
        t, _ = dist.reduce_sum(torch.tensor([samples, batches], dtype=torch.float64, device=obj.device), 0.0)
        samples, batches = float(t[0]), float(t[1])
    return {"num_samples": int(samples), "num_batches": int(batches), "reduction": str(obj.reduction),
            "dtype": str(obj.dtype).replace("torch.", ""), "device": str(obj.device),
            "hvp_method": q.operator.method, "model_training_mode": bool(model.training),
            "world_size": dist.world_size(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _versions() -> Dict[str, str]:
    import matplotlib
    import numpy
    import scipy

    from .._version import __version__

    return {"nethessian": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "matplotlib": matplotlib.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no inf / nan; the page shows "∞"
    return x


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
