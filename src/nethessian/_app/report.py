"""One self-contained HTML page (and a JSON file of the same numbers) about a cost's curvature.

``report_problem`` computes, at the model's current parameters: J, the gradient, the
Hessian (dense, drawn as a heatmap by parameter block, when P ≤ ``dense_max_params``),
its eigenvalues and the minimum / saddle / not-stationary verdict, the condition
number, the trace (exact, or Hutch++ with a standard error) per parameter block,
the spectral density (exact, or stochastic Lanczos quadrature), the quadratic
model along the top eigenvector, the gradient and a random direction, and every
setting and version needed to rerun it. Above the size threshold only
matrix-free methods run, and the page says so. The page has no external asset:
figures are base64 PNG data URIs, the CSS is inline. The numbers come from the
library's estimators (``trace``, ``eigenvalues``, ``spectral_density``,
``QuadraticModel.compare``) on the problem's one operator; nothing is recomputed here.

Every process computes (the products all-reduce); only rank 0 writes files.
"""

from __future__ import annotations

import base64
import datetime
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .. import distributed as dist
from .._checks import as_int
from ..errors import InputError
from .problem import Problem
from .report_html import SECTIONS, render_page
from .cost import estimate_line, product_time
from .report_more import input_dim, lanczos_ncv, planned_extra
from .report_notes import reduction_text
from .report_sections import COSTLY, OFF_BY_DEFAULT, compute, is_dense
from .saving import to_json, versions, write_atomic

__all__ = ["ReportPaths", "SECTIONS", "build_report", "report_problem"]

ALWAYS = {"summary", "problem", "gradient", "reproduce"}
DEFAULTS = dict(dense_max_params=2000, num_eigs=5, trace_matvecs=90, density_probes=8, lanczos_steps=80)


@dataclass(frozen=True)
class ReportPaths:
    """Where the report went: the HTML page and the JSON file (written on rank 0 only)."""

    html: pathlib.Path
    json: pathlib.Path


def build_report(model, loss_fn, data, out_dir, *, problem_name: Optional[str] = None, **options) -> ReportPaths:
    """The report of a problem given as Python objects; ``problem_name`` names it on the page.

    ``options`` are :func:`report_problem`'s (``params``, ``seed``, ``title``, the budgets
    ``dense_max_params``, ``num_eigs``, ``trace_matvecs``, ``density_probes``,
    ``lanczos_steps``, ``ncv``, and ``quadratic_radius``, ``sections``, ``progress``).
    """
    return report_problem(Problem(model, loss_fn, data, name=problem_name), out_dir, **options)


def report_problem(
    problem: Problem,
    out_dir,
    *,
    params: Optional[Sequence[str]] = None,
    seed: int = 0,
    title: str = "nethessian report",
    dense_max_params: int = 2000,
    num_eigs: int = 5,
    trace_matvecs: int = 90,
    density_probes: int = 8,
    lanczos_steps: int = 80,
    ncv: Optional[int] = None,
    quadratic_radius: Optional[float] = None,
    sections: Optional[Sequence[str]] = None,
    progress: Optional[bool] = False,
) -> ReportPaths:
    """Compute the curvature summary of J at the current parameters; write ``report.html`` and ``report.json``.

    Args:
        problem: the :class:`~nethessian._app.problem.Problem` (its one operator is used throughout).
        out_dir: folder for the two files (created if missing).
        params: parameter names or globs (see :class:`~nethessian.Objective`).
        seed: seed of every random draw (Lanczos start, trace and density probes, random direction).
        title: the page title.
        dense_max_params: form the dense P × P Hessian when P is at most this; above it
            every section is matrix-free (Lanczos, Hutch++, SLQ).
        num_eigs: matrix-free: this many largest and this many smallest eigenvalues.
        trace_matvecs: matrix-free: the Hutch++ product budget.
        density_probes: matrix-free: SLQ probes.
        lanczos_steps: matrix-free: Lanczos steps per SLQ probe.
        ncv: matrix-free: basis vectors of every eigenvalue run (default ``nh.eigenvalues``'
            ``max(2k + 1, 20)``); the memory is ``P × ncv`` entries, so a large model needs a
            smaller one (at least ``num_eigs + 1``).
        quadratic_radius: largest |α| of the quadratic-model plot (default: where
            ½ λ_max α² reaches J, clipped to [1e-3, 10]); the grid is 41 points
            symmetric about α = 0, which is exactly 0.
        sections: the sections to compute and show (ids of :data:`SECTIONS`; default all but
            ``input-hessian``, which costs D products per input entry and is asked for by name). Summary,
            problem, gradient and reproduce are always shown; a costly section left out spends nothing.
        progress: ``False`` quiet; ``True`` or ``None`` the estimated cost up front, then stage
            names and timings on stderr (rank 0), with progress bars from the start (``True``) or
            only for work past a few seconds (``None``, auto; log lines when stderr is not a terminal).

    Returns:
        ``ReportPaths(html, json)`` (the same on every rank; the files exist on rank 0).

    Raises:
        InputError: the output folder cannot be written, or a setting is not a positive integer.
    """
    S = _settings(
        dict(
            seed=seed,
            dense_max_params=dense_max_params,
            num_eigs=num_eigs,
            trace_matvecs=trace_matvecs,
            density_probes=density_probes,
            lanczos_steps=lanczos_steps,
            ncv=ncv,
            quadratic_radius=quadratic_radius,
            params=None if params is None else list(params),
            sections=sections,
        )
    )
    out = pathlib.Path(os.fspath(out_dir)).expanduser()
    why_not = _output_problem(out) if dist.is_main() else None
    stages = _Stages(progress is not False and dist.is_main())
    q = stages("objective and gradient", lambda: problem.quadratic(params))
    _raise_together(why_not, out, q.objective.device)
    line = estimate_cost(q, S)  # on every rank: a product is a collective under torch.distributed
    if stages.verbose:
        print(f"nethessian report: {line}", file=sys.stderr, flush=True)
    R, figs = compute(q, S, stages, progress if dist.is_main() else False, problem)
    R["title"], R["problem"] = title, problem.describe()
    R["settings"] = {**S, **_run_settings(q, problem.model)}
    R["versions"] = versions()
    R["timings_s"] = stages.times
    paths = ReportPaths(out / "report.html", out / "report.json")
    if dist.is_main():
        images = {k: _data_uri(fn()) for k, fn in figs.items()}
        write_atomic(paths.json, to_json(R, indent=1) + "\n")
        write_atomic(paths.html, render_page(R, images))
    return paths


def _settings(S: Dict[str, Any]) -> Dict[str, Any]:
    known = [sid for sid, _ in SECTIONS]
    chosen = [k for k in known if k not in OFF_BY_DEFAULT] if S["sections"] is None else list(S["sections"])
    bad = [x for x in chosen if x not in known]
    if bad or isinstance(S["sections"], str):
        raise InputError(f"unknown report section(s) {bad or S['sections']!r}; choose from {', '.join(known)}")
    S["sections"] = [sid for sid in known if sid in set(chosen) | ALWAYS]
    for name in DEFAULTS:
        S[name] = as_int(name, S[name], minimum=0 if name == "dense_max_params" else 1)
    if S["ncv"] is not None:  # refused now, not after the sections before the first Lanczos run
        S["ncv"] = as_int("ncv", S["ncv"], minimum=S["num_eigs"] + 1)
    if S["quadratic_radius"] is not None and not (
        isinstance(S["quadratic_radius"], (int, float)) and 0 < S["quadratic_radius"] < float("inf")
    ):
        raise InputError(f"quadratic_radius must be a positive number, got {S['quadratic_radius']!r}")
    return S


# ----------------------------------------------------------------------------- cost
def planned_products(P: int, S: Dict[str, Any], numels: Sequence[int] = (), input_dim: Optional[int] = None) -> tuple:
    """(fewest, most) Hessian (and GGN) products the chosen sections take (Lanczos stops when converged).

    ``numels`` (entries per parameter) sizes the per-block section, ``input_dim`` (entries per
    sample) the input-Hessian section; without them those sections are not counted.
    """
    want = set(S["sections"])
    dense = is_dense(P, S)
    extra = planned_extra(P, numels, S, dense, input_dim)
    n_quadratic = 3 if "quadratic" in want else 0  # one product per direction inside compare()
    if dense:
        base = P + n_quadratic if want & set(COSTLY) - {"input-hessian"} else 0
        return base + extra[0], base + extra[1]
    k = min(S["num_eigs"], P - 1)
    ncv = lanczos_ncv(S, k, P)
    runs = ("eigenvalues" in want) + bool(want & {"eigenvalues", "quadratic", "eigenvectors", "ggn"})
    fixed = (
        n_quadratic
        + (S["trace_matvecs"] if "trace" in want else 0)
        + (S["density_probes"] * min(S["lanczos_steps"], P) + 2 if "density" in want else 0)
    )  # + symmetry check
    return fixed + runs * ncv + extra[0], fixed + runs * 20 * ncv + extra[1]


def estimate_cost(q, S: Dict[str, Any]) -> str:
    """One line: the planned products × the time of one product measured now (one extra product)."""
    P = q.layout.size
    products = planned_products(
        P, S, q.layout.numels, input_dim(q.objective) if "input-hessian" in S["sections"] else None
    )
    what = "Hessian-vector" + (" and GGN-vector" if "ggn" in S["sections"] else "")
    return estimate_line(P, "dense" if is_dense(P, S) else "matrix-free", products, product_time(q.operator), what)


# ----------------------------------------------------------------------------- output folder
def _output_problem(out: pathlib.Path) -> Optional[str]:
    """Why ``out`` cannot take the report (``None`` when it can): created, then probed by a write."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nethessian-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return (
            f"cannot write the report to {str(out)!r}: {exc.strerror or exc}. Pass an out_dir "
            "you can write to (a new folder is created), or fix the folder's permissions"
        )
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
    """Run named stages, time them, and say their names and durations on stderr when asked."""

    def __init__(self, verbose: bool):
        self.verbose, self.times = verbose, {}

    def __call__(self, name: str, fn: Callable[[], Any]):
        if self.verbose:
            print(f"nethessian report: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        out = fn()
        self.times[name] = round(time.perf_counter() - t0, 4)
        if self.verbose:
            print(f"nethessian report: {name} done in {self.times[name]:.2f} s", file=sys.stderr, flush=True)
        return out


# ----------------------------------------------------------------------------- context
def _run_settings(q, model) -> Dict[str, Any]:
    obj = q.objective
    samples, batches = 0.0, 0.0
    for b in obj.data:
        samples += float(b.targets.shape[0]) if b.targets.ndim else 1.0
        batches += 1.0
    if dist.is_active():
        t, _ = dist.reduce_sum(torch.tensor([samples, batches], dtype=torch.float64, device=obj.device), 0.0)
        samples, batches = float(t[0]), float(t[1])
    return {
        "num_samples": int(samples),
        "num_batches": int(batches),
        "reduction": reduction_text(obj.reduction, obj.loss_fn),
        "dtype": str(obj.dtype).replace("torch.", ""),
        "device": str(obj.device),
        "hvp_method": q.operator.method,
        "model_training_mode": bool(model.training),
        "world_size": dist.world_size(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
