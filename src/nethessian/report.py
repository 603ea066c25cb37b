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
import html
import json
import math
import os
import pathlib
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import distributed as dist
from .errors import InputError

__all__ = ["ReportPaths", "build_report"]

SECTIONS = (("summary", "Summary"), ("problem", "Problem"), ("hessian", "Hessian"),
            ("eigenvalues", "Eigenvalues and verdict"), ("trace", "Trace"),
            ("density", "Spectral density"), ("quadratic", "Quadratic model"),
            ("gradient", "Gradient"), ("reproduce", "Reproduce"))


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
    from .quadratic import QuadraticModel

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
        paths.html.write_text(_page(R, images), encoding="utf-8")
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
    from . import plots
    from .dense import BlockHessian
    from .verdict import classify_point

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
        from .linalg.trace import trace as trace_fn
        from .linalg.density import spectral_density
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
    from .linalg.lanczos import eigenvalues

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
    from .linalg.trace import TraceEstimate

    blocks = {n: TraceEstimate(float(torch.trace(H[n].double())), 0.0, P, "exact") for n in H.names}
    return TraceEstimate(float(torch.trace(H.dense.double())), 0.0, P, "exact", blocks)


def _exact_density(lam: torch.Tensor, grid_size: int = 1000):
    """Every eigenvalue with weight 1/P, broadened like SLQ (σ = spread / 100)."""
    from .linalg.density import SpectralDensity

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
    from .examples import TwoLayerNet

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

    from . import __version__

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


# ----------------------------------------------------------------------------- the page
_CSS = """
:root{--ink:#1d2330;--muted:#5d6678;--line:#e2e6ee;--bg:#f3f5f8;--pos:#c0392b;--neg:#2763b8;
--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue","DejaVu Sans",Arial,sans-serif}
.wrap{max-width:1060px;margin:0 auto;padding:0 28px}
header{background:linear-gradient(120deg,#18233d,#2b426e);color:#fff;padding:30px 0 26px}
header h1{margin:0;font-size:27px;font-weight:650;letter-spacing:-.01em}
header .problem{font-size:17px;margin:6px 0 10px;opacity:.95}
header .meta{font-size:13px;opacity:.75}
.tag{display:inline-block;padding:1px 10px;border-radius:999px;font-size:12px;font-weight:600;
background:rgba(255,255,255,.16);border:1px solid rgba(255,255,255,.35);margin-right:6px}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line)}
nav .wrap{display:flex;flex-wrap:wrap;gap:2px 18px;padding-top:9px;padding-bottom:9px;font-size:13.5px}
nav a{color:var(--muted);text-decoration:none}nav a:hover{color:var(--ink)}
section{background:#fff;border:1px solid var(--line);border-radius:12px;padding:22px 28px;margin:20px 0;
box-shadow:0 1px 2px rgba(20,30,50,.04)}
h2{font-size:20px;margin:0 0 12px;font-weight:650}
h3{font-size:15.5px;margin:18px 0 6px}
p{margin:8px 0}.muted{color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px;margin:4px 0 14px}
.card{border:1px solid var(--line);border-radius:9px;padding:10px 14px;background:#fafbfd}
.card .k{font-size:11.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card .v{font:600 18px/1.35 var(--mono);overflow-wrap:anywhere}
.card .s{font-size:12px;color:var(--muted)}.card .v.small{font-size:15.5px;padding-top:2px}
.verdict{border-left:5px solid;border-radius:6px;padding:11px 16px;margin:10px 0;font-size:15px}
.verdict b{text-transform:uppercase;letter-spacing:.04em;font-size:13px;margin-right:8px}
.v-minimum{border-color:#1e8449;background:#eaf7ef}.v-saddle{border-color:#d68910;background:#fdf3e3}
.v-not-stationary{border-color:#5d6d7e;background:#eef1f5}.v-maximum{border-color:#7d3c98;background:#f4ecf7}
.v-degenerate{border-color:#909497;background:#f2f3f4}
.banner{border:1px solid #f0c36d;background:#fff8e6;border-radius:8px;padding:10px 14px;margin:10px 0;font-size:14px}
table{border-collapse:collapse;font-size:13.5px;margin:8px 0 4px}
th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em;
text-align:left;padding:5px 12px;border-bottom:2px solid var(--line)}
td{padding:4px 12px;border-bottom:1px solid var(--line);vertical-align:top}
td.num,.mono{font-family:var(--mono);font-variant-numeric:tabular-nums;white-space:nowrap}
td.num{text-align:right}
table.matrix td{padding:2px 8px;font-size:12.5px}table.matrix th{text-transform:none;font-family:var(--mono)}
.blocks{display:flex;flex-wrap:wrap;gap:8px 30px;align-items:flex-start}
figure{margin:14px 0 6px;text-align:center}
figure img{max-width:100%;height:auto;border-radius:6px}
figcaption{font-size:13px;color:var(--muted);margin-top:4px;text-align:left}
pre{font:12.5px/1.5 var(--mono);background:#f6f8fa;border:1px solid var(--line);border-radius:8px;
padding:10px 14px;overflow-x:auto}
details summary{cursor:pointer;color:var(--muted);font-size:13.5px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:0 30px}
@media (max-width:800px){.cols{grid-template-columns:1fr}}
footer{color:var(--muted);font-size:12.5px;padding:6px 0 30px}
.pos{color:var(--pos)}.neg{color:var(--neg)}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _f(x, digits: int = 6) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _num(x, digits: int = 6, signed: bool = False, sci: bool = False) -> str:
    """A right-aligned monospace cell; ``signed`` colours it red (> 0) or blue (< 0) like the figures,
    ``sci`` writes ``+d.ddde±xx`` so that a column of numbers lines up."""
    finite = isinstance(x, float) and math.isfinite(x)
    sign = "" if not signed or not finite or x == 0 else (" pos" if x > 0 else " neg")
    text = (f"{x:+.{digits - 1}e}" if signed else f"{x:.{digits - 1}e}") if sci and finite else _f(x, digits)
    return f'<td class="num{sign}">{_e(text)}</td>'


def _table(headers: Sequence[str], rows: List[List[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _card(label: str, value: str, key: str, raw=None, sub: str = "", small: bool = False) -> str:
    data = f' data-key="{_e(key)}"' + ("" if raw is None else f' data-value="{_e(repr(raw))}"')
    v = '<div class="v small">' if small else '<div class="v">'
    return (f'<div class="card"{data}><div class="k">{_e(label)}</div>{v}{value}</div>'
            + (f'<div class="s">{sub}</div>' if sub else "") + "</div>")


def _fig(images: Dict[str, str], key: str, alt: str, caption: str = "") -> str:
    if key not in images:
        return ""
    return (f'<figure id="fig-{key}"><img src="{images[key]}" alt="{_e(alt)}">'
            + (f"<figcaption>{caption}</figcaption>" if caption else "") + "</figure>")


def _matrix(M: List[List[float]], rows: List[str], cols: List[str], scale: float) -> str:
    flat = [abs(v) for r in M for v in r] or [0.0]
    big = max(flat)
    fmt = "{:+.6f}" if 1e-3 <= big < 1e3 else "{:+.3e}"
    body = []
    for name, r in zip(rows, M):
        cells = []
        for v in r:
            a = 0.55 * math.sqrt(abs(v) / scale) if scale else 0.0
            rgb = "192,57,43" if v > 0 else "39,99,184"
            cells.append(f'<td class="num" style="background:rgba({rgb},{a:.3f})">{_e(fmt.format(v))}</td>')
        body.append(f'<th>{_e(name)}</th>' + "".join(cells))
    return _table([""] + cols, [[b] for b in body], cls="matrix")


def _entry_names(name: str, shape: Sequence[int]) -> List[str]:
    idx = [[]]
    for s in shape:
        idx = [i + [j] for i in idx for j in range(s)]
    return [f"{name}[{','.join(map(str, i))}]" for i in idx]


def _page(R: Dict[str, Any], images: Dict[str, str]) -> str:
    dense, P, v = R["mode"] == "dense", R["num_parameters"], R["verdict"]
    st, tr = R["settings"], R["trace"]
    lam = R["eigenvalues"]["all"] if dense else (R["eigenvalues"]["smallest"]["eigenvalues"]
                                                  + R["eigenvalues"]["largest"]["eigenvalues"])
    kind = v["kind"].replace(" ", "-")
    free_note = (f'<div class="banner"><b>Matrix-free mode.</b> P = {P:,} parameters is above '
                 f'<span class="mono">dense_max_params = {st["dense_max_params"]:,}</span>, so the dense '
                 f"P × P Hessian is not formed: eigenvalues come from thick-restart Lanczos, the trace from "
                 f"Hutch++ ({tr['num_matvecs']} products, ± standard error) and the density from stochastic "
                 f"Lanczos quadrature ({st['density_probes']} probes × {R['density']['lanczos_steps']} steps). "
                 "Raise dense_max_params for the exact dense sections.</div>") if not dense else ""
    cond = v["condition_number"]
    cond_txt = ("≥ " if v["condition_number_is_lower_bound"] else "") + _e(_f(cond, 4))
    trace_txt = _e(_f(tr["value"], 6)) + ("" if tr["method"] == "exact" else f" ± {_e(_f(tr['stderr'], 2))}")
    verdict_box = (f'<div class="verdict v-{kind}"><b>{_e(v["kind"])}</b>{_e(v["message"])}</div>')
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f'<title>{_e(R["title"])} — {_e(R["problem"]["name"])}</title><style>{_CSS}</style></head><body>',
           f'<header><div class="wrap"><h1>{_e(R["title"])}</h1><div class="problem">{_e(R["problem"]["name"])}</div>'
           f'<div class="meta"><span class="tag">{_e(R["mode"])}</span><span class="tag">P = {P:,}</span>'
           f'<span class="tag">{_e(st["dtype"])} · {_e(st["device"])}</span> {_e(st["date"])}</div></div></header>',
           '<nav><div class="wrap">' + "".join(f'<a href="#{i}">{_e(t)}</a>' for i, t in SECTIONS) + "</div></nav>",
           '<main class="wrap">']
    # summary
    cards = [_card("parameters P", _e(f"{P:,}"), "num_parameters", P),
             _card("cost J", _e(_f(R["cost"], 8)), "cost", R["cost"]),
             _card("gradient norm ‖∇J‖", _e(_f(R["gradient_norm"], 4)), "gradient_norm", R["gradient_norm"]),
             _card("largest eigenvalue", _e(_f(max(lam), 5)), "lambda_max", max(lam)),
             _card("smallest eigenvalue", _e(_f(min(lam), 5)), "lambda_min", min(lam),
                   "" if dense else "of the computed extremes"),
             _card("condition number", cond_txt, "condition_number", cond),
             _card("trace of H", trace_txt, "trace", tr["value"], _e(tr["method"])),
             _card("eigenvalue signs", f'<span class="neg">{v["num_negative"]} −</span> · '
                   f'<span class="pos">{v["num_positive"]} +</span> · {v["num_zero"]} ≈0', "signs", None,
                   "negative · positive · ~zero" + ("" if dense else ", of the computed extremes"), True)]
    out.append(f'<section id="summary"><h2>Summary</h2>{free_note}<div class="cards">{"".join(cards)}</div>'
               f"{verdict_box}</section>")
    # problem
    prob = R["problem"]
    rows = [[f'<td class="mono">{_e(p["name"])}</td>', f'<td class="mono">{_e(tuple(p["shape"]))}</td>',
             _num(p["numel"])] for p in R["parameters"]]
    out.append(f'<section id="problem"><h2>Problem</h2><p><b>{_e(prob["name"])}</b></p>'
               + (f"<p>{_e(prob['description'])}</p>" if prob["description"] else "")
               + f'<p class="muted">model <span class="mono">{_e(prob["model"])}</span>, loss '
               f'<span class="mono">{_e(prob["loss"])}</span> (reduction {_e(st["reduction"])}), '
               f'{st["num_samples"]:,} samples in {st["num_batches"]:,} batch(es); J is over the whole data set.</p>'
               + _table(["parameter", "shape", "entries"], rows)
               + f'<details><summary>model</summary><pre>{_e(prob["model_repr"])}</pre></details></section>')
    # hessian
    h = ['<section id="hessian"><h2>Hessian</h2>']
    if dense:
        h.append(f"<p>The exact {P} × {P} Hessian H = ∇²J(θ), formed column by column from Hessian-vector "
                 "products; parameters flattened row-major in the order above. Red is positive, blue negative; "
                 f"heavy lines separate parameter blocks. Relative asymmetry max|H − Hᵀ|/max|H| = "
                 f'<span class="mono">{_e(_f(R["hessian"]["asymmetry"], 2))}</span>.</p>')
        h.append(_fig(images, "heatmap", "heatmap of the Hessian by parameter block"))
        blocks = R["hessian"]["blocks"]
        if blocks and P <= 16:
            scale = max(abs(x) for row in R["hessian"]["dense"] for x in row) or 1.0
            shapes = {p["name"]: p["shape"] for p in R["parameters"]}
            h.append('<h3>The blocks</h3><div class="blocks">')
            for key, b in blocks.items():
                h.append(f'<div><p><b>{_e(key)}</b> = {_e(b["of"])}</p>'
                         + _matrix(b["values"], _entry_names(b["rows"], shapes[b["rows"]]),
                                   _entry_names(b["cols"], shapes[b["cols"]]), scale) + "</div>")
            h.append("</div>")
    else:
        h.append(free_note + "<p>No heatmap: the matrix is never formed. Every number below comes from "
                 "Hessian-vector products.</p>")
    out.append("".join(h) + "</section>")
    # eigenvalues
    e = [f'<section id="eigenvalues"><h2>Eigenvalues and verdict</h2>{verdict_box}',
         f'<p>Condition number <span class="mono">{cond_txt}</span> <span class="muted">({_e(v["condition_number_note"])}'
         f'; ∞ when an eigenvalue is ~0)</span>. A point is stationary when ‖∇J‖ ≤ 1e-6; only then can it '
         "be a minimum or a saddle.</p>"]
    if dense:
        e.append(_fig(images, "eigenvalues", "eigenvalues of the Hessian"))
        rows = [[_num(i), _num(x, 10, True, True)] for i, x in enumerate(lam, 1)]
        if P > 40:
            rows = rows[:10] + [['<td class="num muted">⋯</td>', '<td class="num muted">⋯</td>']] + rows[-10:]
        e.append(_table(["#", "eigenvalue λ"], rows))
    else:
        e.append(_fig(images, "eigenvalues", "extreme eigenvalues of the Hessian"))
        for which in ("largest", "smallest"):
            r = R["eigenvalues"][which]
            e.append(f'<h3>{which} ({r["num_matvecs"]} products, converged: {r["converged"]})</h3>'
                     + _table(["eigenvalue λ", "residual ‖Hv − λv‖"],
                              [[_num(x, 10, True, True), _num(res, 3, sci=True)] for x, res in zip(r["eigenvalues"], r["residuals"])]))
    out.append("".join(e) + "</section>")
    # trace
    exact = tr["method"] == "exact"
    how = ("exact: the sum of the dense Hessian's diagonal" if exact else
           f"Hutch++ with {tr['num_matvecs']} Hessian-vector products; ± one standard error")
    brow = [[f'<td class="mono">{_e(n)}</td>', _num(b["value"], 8, True, True),
             '<td class="num muted">exact</td>' if exact else _num(b["stderr"], 3, sci=True),
             _num(b["value"] / tr["value"] if tr["value"] else float("nan"), 3)] for n, b in tr["blocks"].items()]
    out.append(f'<section id="trace"><h2>Trace</h2><p>tr H = <span class="mono">{trace_txt}</span> '
               f'<span class="muted">({_e(how)})</span>: the sum of the eigenvalues. Per parameter block, the trace '
               "of the diagonal block (the blocks add up to the total):</p>"
               + _fig(images, "trace", "trace of each diagonal block")
               + _table(["block", "trace", "std. error", "share"], brow) + "</section>")
    # density
    d = R["density"]
    dtxt = ("Each eigenvalue carries weight 1/P, broadened by a Gaussian of width σ = "
            f"{_f(d['sigma'], 3)}; the ticks at the bottom are the eigenvalues." if dense else
            f"Stochastic Lanczos quadrature: {d['num_probes']} Gaussian probes × {d['lanczos_steps']} Lanczos "
            f"steps ({d['num_matvecs']} products), broadened with σ = {_f(d['sigma'], 3)}.")
    out.append(f'<section id="density"><h2>Spectral density</h2><p>{_e(dtxt)}</p>'
               + _fig(images, "density", "spectral density of the Hessian") + "</section>")
    # quadratic model
    qd = R["quadratic"]
    qrows = [[f"<td>{_e(x['label'])}</td>", _num(x["g_dot_d"], 5, True), _num(x["curvature_dHd"], 5, True),
              _num(x["slope"], 3)] for x in qd["directions"]]
    out.append('<section id="quadratic"><h2>Quadratic model</h2><p>Along a unit direction d, the true cost '
               "J(θ + αd) against the second-order Taylor model q(αd) = J + α gᵀd + ½ α² dᵀHd, for |α| ≤ "
               f'<span class="mono">{_e(_f(qd["radius"], 3))}</span>. Where they part, third and higher '
               "derivatives matter; the slope of log|J − q| against log|α| is about 3 for a smooth cost.</p>"
               + _fig(images, "quadratic", "true cost against the quadratic model")
               + _table(["direction d", "gᵀd", "dᵀHd", "slope of |J − q|"], qrows) + "</section>")
    # gradient
    prow = [[f'<td class="mono">{_e(n)}</td>', _num(x, 6)] for n, x in R["gradient_norm_by_parameter"].items()]
    gr = [f'<section id="gradient"><h2>Gradient</h2><p>‖∇J‖ = <span class="mono">{_e(_f(R["gradient_norm"], 8))}'
          "</span>" + (" (not a stationary point)." if v["kind"] == "not stationary" else ".") + "</p>",
          _table(["parameter", "‖∂J/∂parameter‖"], prow)]
    if R["gradient"] and P <= 40:
        gr.append('<div class="blocks">')
        for p in R["parameters"]:
            vals = torch.tensor(R["gradient"][p["name"]], dtype=torch.float64).reshape(-1).tolist()
            shape = p["shape"] if len(p["shape"]) == 2 else [len(vals), 1]
            rows_ = [vals[i * shape[1]:(i + 1) * shape[1]] for i in range(shape[0])]
            gr.append(f'<div><p class="mono">∂J/∂{_e(p["name"])}</p>'
                      + _matrix(rows_, [str(i) for i in range(shape[0])], [str(j) for j in range(shape[1])],
                                max(max(abs(x) for x in vals), 1e-300)) + "</div>")
        gr.append("</div>")
    out.append("".join(gr) + "</section>")
    # reproduce
    keys = ["seed", "dense_max_params", "num_eigs", "trace_matvecs", "density_probes", "lanczos_steps",
            "quadratic_radius", "params", "num_samples", "num_batches", "reduction", "dtype", "device",
            "hvp_method", "model_training_mode", "world_size", "date"]
    srows = [[f'<td class="mono">{_e(k)}</td>', f'<td class="mono">{_e(st.get(k))}</td>'] for k in keys]
    vrows = [[f'<td class="mono">{_e(k)}</td>', f'<td class="mono">{_e(x)}</td>'] for k, x in R["versions"].items()]
    trows = [[f"<td>{_e(k)}</td>", _num(x, 3)] for k, x in R["timings_s"].items()]
    call = ("import nethessian as nh\nfrom nethessian.report import build_report\n"
            + ("model, loss_fn, data = nh.examples.two_layer()\n" if prob["model"] == "TwoLayerNet"
               else "model, loss_fn, data = ...  # the same problem\n")
            + "build_report(model, loss_fn, data, \"report\",\n"
            + ",\n".join(f"             {k}={st[k]!r}" for k in keys[:8]) + ")")
    out.append('<section id="reproduce"><h2>Reproduce</h2><p>Settings, data size and versions of this run; '
               'every number on this page is also in <span class="mono">report.json</span> next to it.</p>'
               '<div class="cols"><div><h3>Settings</h3>' + _table(["setting", "value"], srows)
               + "</div><div><h3>Versions</h3>" + _table(["package", "version"], vrows)
               + "<h3>Time</h3>" + _table(["stage", "seconds"], trows) + "</div></div>"
               + f"<h3>Call</h3><pre>{_e(call)}</pre></section>")
    out.append(f'</main><footer><div class="wrap">Made by nethessian {_e(R["versions"]["nethessian"])} '
               f'on {_e(st["date"])}.</div></footer></body></html>')
    return "\n".join(out)
