"""``nethessian demo``: the two-layer network's J, gradient, Hessian blocks, eigenvalues and Newton.

One operator (one Objective) serves J, g, the dense Hessian and the finite
differences; Newton's end point is evaluated on the same objective at the new θ.
"""

from __future__ import annotations

import torch

from .problem import load_problem

__all__ = ["demo_result", "print_demo", "newton_text"]

BLOCKS = {"a": ("W1", "W1"), "b": ("W1", "W2"), "c": ("W2", "W2")}


def _fmt_matrix(M: torch.Tensor, indent: str = "    ") -> str:
    rows = M.detach().cpu().double().reshape(M.shape[0], -1).tolist()
    return "\n".join(indent + "  ".join(f"{x:+.6f}" for x in r) for r in rows)


def demo_result(seed: int = 0, problem=None) -> dict:
    """The numbers ``nethessian demo`` shows for the two-layer network (``problem``: a loaded Problem)."""
    from .._check import fd_hessian
    from .._dense import BlockHessian
    from .._verdict import classify_point

    problem = problem or load_problem("two-layer", seed=seed)
    op = problem.operator()
    obj = op.objective
    J, g = obj.value_and_grad()
    H = BlockHessian(op.to_dense(), op.layout)
    fd = BlockHessian(fd_hessian(obj), H.layout)
    eig = H.eigvalsh()
    verdict = classify_point(eig, float(g.norm()))
    fd_err = {}
    for key, (r, c) in BLOCKS.items():
        diff = (H[r, c] - fd[r, c]).abs().max()
        fd_err[key] = float(diff / H[r, c].abs().max().clamp_min(1e-300))
    return {
        "seed": seed,
        "J": J,
        "gradient": {n: t.tolist() for n, t in H.layout.unflatten(g).items()},
        "gradient_norm": float(g.norm()),
        "blocks": {
            k: {"of": f"d2J/d{r} d{c}", "shape": list(H[r, c].shape), "values": H[r, c].tolist()}
            for k, (r, c) in BLOCKS.items()
        },
        "eigenvalues": eig.tolist(),
        "verdict": verdict.to_dict(),
        "fd_relative_difference": fd_err,
        "_H": H,
        "_g": g,
        "_problem": problem,
    }


def print_demo(res: dict) -> None:
    """The demo's numbers as text on stdout."""
    H, g = res["_H"], res["_g"]
    p = print
    p("nethessian demo: the 2-3-1 sigmoid network (no biases), J = ½ Σ (y − ŷ)²")
    p("  z2 = X W1, a2 = f(z2), z3 = a2 W2, ŷ = f(z3); X = sleep/study hours scaled by column max,")
    p(f"  y = test scores / 100; weights drawn with seed {res['seed']}\n")
    p(f"J = {res['J']:.10f}\n")
    p(f"gradient (‖g‖ = {res['gradient_norm']:.3e})")
    for name, t in H.layout.unflatten(g).items():
        p(f"  dJ/d{name}  shape {tuple(t.shape)}\n{_fmt_matrix(t)}")
    p("\nHessian blocks (parameters flattened row-major)")
    for key, b in res["blocks"].items():
        r, c = b["of"].replace("d2J/d", "").split(" d")
        p(f"  {key} = ∂²J/∂{r}∂{c}" if r != c else f"  {key} = ∂²J/∂{r}²", f" shape {tuple(b['shape'])}")
        p(_fmt_matrix(H[r, c]))
    p("\neigenvalues of H (ascending)")
    p("  " + "  ".join(f"{x:+.4e}" for x in res["eigenvalues"]))
    p(f"  → {res['verdict']['message']}")
    p("\nlargest relative difference from central finite differences (max |H − FD| / max |H|)")
    for key, err in res["fd_relative_difference"].items():
        p(f"  {key}: {err:.1e}")


def _hessian_at(problem, theta: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of H at ``theta`` on the problem's own operator (``op.at``, contract C3)."""
    op = problem.operator()
    return torch.linalg.eigvalsh(op.at(theta).to_dense().double())


def newton_text(problem) -> str:
    """Damped Newton from the problem's weights, and the verdict at its end point."""
    from .._newton import newton
    from .._verdict import classify_point

    res = newton(problem.operator())  # on the problem's one Objective
    eig = _hessian_at(problem, res.theta)
    verdict = classify_point(eig, res.gradient_norms[-1], rtol=1e-6, gtol=1e-8)
    exact_fit = verdict.kind == "degenerate" and res.value < 1e-20
    return (
        "damped Newton on the two-layer network (Levenberg–Marquardt damping λ = μ‖g‖; "
        "see docs/quadratic-and-newton.md)\n"
        + res.table()
        + "\n\neigenvalues of H at the end point\n  "
        + "  ".join(f"{x:+.4e}" for x in eig.tolist())
        + f"\n  → {verdict.message}"
        + (
            f"\n  J = {res.value:.1e} and J = ½Σ(y − ŷ)² ≥ 0, so this is a global minimum, not isolated: the "
            f"network fits all 3 points exactly, and the {verdict.num_zero} flat directions are tangent to a "
            "whole set of exact fits"
            if exact_fit
            else ""
        )
    )
