"""``nh.check``: validate nethessian on the user's own model against finite differences.

Everything runs on a float64 copy of the model (the user's model is untouched):

* Hessian-vector products against finite differences of the gradient along random
  directions, with a step chosen per direction and Richardson extrapolation
  (``_finite_differences``), which also estimate their own error;
* symmetry: ``uᵀ(Hv)`` against ``vᵀ(Hu)``;
* for small P, the dense Hessian against single-column products, and every named block
  against the finite-difference Hessian built column by column, each column with its own step.

A finite-difference comparison passes when the largest difference in it is within

    max(tolerance · scale, κ · estimated finite-difference error),   κ = 10,

with scale the largest entry compared. So badly scaled models, where finite differences are
less accurate, are not reported as wrong, and a wrong Hessian still fails whenever its error
exceeds what the finite differences can resolve (typically 1e-8 of the scale or better).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from . import _checks
from ._dense import BlockHessian
from ._finite_differences import U, directional_derivative, fd_hessian, fd_hessian_with_errors
from .operators._hessian import HessianOperator

__all__ = ["CheckReport", "Comparison", "check", "fd_hessian"]

#: safety factor on the estimated finite-difference error
KAPPA = 10.0
#: a block whose finite-difference error estimate exceeds this (relative) is flagged as not resolved
UNRESOLVED = 1e-3


@dataclass(frozen=True)
class Comparison:
    """One comparison with finite differences, relative to ``scale`` (the largest entry compared).

    Attributes:
        error: max |nethessian − finite differences| / scale.
        estimate: estimated error of the finite differences / scale.
        tolerance: the relative error allowed, max(tolerance, κ · estimate).
        step_min, step_max: the smallest and largest step used.
        scale: the largest absolute entry compared.
    """

    error: float
    estimate: float
    tolerance: float
    step_min: float
    step_max: float
    scale: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    @classmethod
    def of(cls, exact: torch.Tensor, fd: torch.Tensor, err: torch.Tensor, steps, tolerance: float):
        scale = max(float(exact.abs().max()), float(fd.abs().max())) if exact.numel() else 0.0
        rel = 1.0 / scale if scale > 0 else 0.0
        diff = float((exact - fd).abs().max()) if exact.numel() else 0.0
        est = float(err.max()) if err.numel() else 0.0
        allowed = max(tolerance * scale, KAPPA * est)
        steps = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
        return cls(
            diff * rel if scale > 0 else diff,
            est * rel,
            allowed * rel if scale > 0 else allowed,
            float(steps.min()),
            float(steps.max()),
            scale,
        )

    def line(self, label: str) -> str:
        step = f"{self.step_min:.1e}" if self.step_min == self.step_max else f"{self.step_min:.1e}…{self.step_max:.1e}"
        verdict = "" if self.passed else f"   FAILED: {self.error / max(self.tolerance, 1e-300):.1e}× the tolerance"
        if self.passed and self.estimate > UNRESOLVED:
            verdict = "   (entries within the finite differences' error: not resolved)"
        return (
            f"  {label:<46}: {self.error:.2e}  (allowed {self.tolerance:.1e}; "
            f"finite-difference error ≈ {self.estimate:.1e}, step {step}){verdict}"
        )

    def to_dict(self) -> dict:
        return {
            "error": self.error,
            "estimate": self.estimate,
            "tolerance": self.tolerance,
            "step_min": self.step_min,
            "step_max": self.step_max,
            "scale": self.scale,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class CheckReport:
    """Largest relative errors found by ``check`` (max-abs difference / max-abs value).

    ``hvp_vs_fd`` and ``blocks_vs_fd`` are the relative differences from finite differences;
    ``hvp_detail`` and ``block_details`` say for each the finite-difference error estimate,
    the tolerance it was held to and the steps used. ``symmetry`` and ``dense_vs_columns``
    compare nethessian with itself and are held to ``tolerance``.
    """

    hvp_vs_fd: float
    symmetry: float
    dense_vs_columns: Optional[float]
    blocks_vs_fd: Optional[Dict[str, float]]
    num_params: int
    tolerance: float
    eps: float
    hvp_detail: Optional[Comparison] = None
    block_details: Optional[Dict[str, Comparison]] = None
    passed: bool = field(init=False)

    def __post_init__(self):
        errs = [self.symmetry] + ([self.dense_vs_columns] if self.dense_vs_columns is not None else [])
        ok = all(e <= self.tolerance for e in errs)
        fd = [(self.hvp_vs_fd, self.hvp_detail)]
        fd += [(e, (self.block_details or {}).get(k)) for k, e in (self.blocks_vs_fd or {}).items()]
        ok = ok and all(c.passed if c is not None else e <= self.tolerance for e, c in fd)
        object.__setattr__(self, "passed", ok)

    def to_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in (
                "hvp_vs_fd",
                "symmetry",
                "dense_vs_columns",
                "blocks_vs_fd",
                "num_params",
                "tolerance",
                "eps",
                "passed",
            )
        }
        out["hvp_detail"] = self.hvp_detail.to_dict() if self.hvp_detail else None
        out["block_details"] = {k: c.to_dict() for k, c in self.block_details.items()} if self.block_details else None
        return out

    def _fd_line(self, label: str, err: float, detail: Optional[Comparison]) -> str:
        return detail.line(label) if detail is not None else f"  {label:<46}: {err:.2e}"

    def __str__(self) -> str:
        lines = [
            f"nethessian check on P = {self.num_params} parameters (float64, a step per direction, "
            f"Richardson extrapolation; allowed = max({self.tolerance:.0e}, {KAPPA:g} × estimated "
            "finite-difference error), relative to the largest entry)",
            self._fd_line("Hessian-vector products vs finite differences", self.hvp_vs_fd, self.hvp_detail),
            f"  {'symmetry  |uᵀHv − vᵀHu| / scale':<46}: {self.symmetry:.2e}  (allowed {self.tolerance:.0e})",
        ]
        if self.dense_vs_columns is not None:
            lines.append(
                f"  {'dense Hessian vs operator columns':<46}: {self.dense_vs_columns:.2e}"
                f"  (allowed {self.tolerance:.0e})"
            )
        for name, err in (self.blocks_vs_fd or {}).items():
            lines.append(self._fd_line(f"block {name}", err, (self.block_details or {}).get(name)))
        lines.append(f"  {'PASSED' if self.passed else 'FAILED'}")
        return "\n".join(lines)


class _RawEngines(HessianOperator):
    """The Hessian engines without their construction-time cross-check.

    ``check`` exists to measure the engines against finite differences and say by how
    much they are off; an operator that refused to be built could not say that.
    """

    _cross_check = False


def _float64_problem(model, loss_fn, data, params, options) -> HessianOperator:
    model64 = copy.deepcopy(model).double()
    if isinstance(loss_fn, torch.nn.Module):  # e.g. class weights of a cross-entropy
        loss_fn = copy.deepcopy(loss_fn).double()
    return _RawEngines(model64, loss_fn, data, params, **options)


def _grad_fn(objective):
    def grad(t):
        return objective.gradient(t).double()

    return grad


def _hvp_check(op, V: torch.Tensor, num_vectors: int, tolerance: float) -> Comparison:
    """Finite differences along the first ``num_vectors`` columns of V; the worst comparison."""
    obj, grad = op.objective, _grad_fn(op.objective)
    theta = obj.theta0.double()
    worst = None
    for j in range(num_vectors):
        fd = directional_derivative(grad, theta, V[:, j], U ** (1 / 3))
        exact = (op @ fd.direction.to(V.dtype)).double()
        c = Comparison.of(exact, fd.value, fd.error, fd.step, tolerance)
        if worst is None or c.error / max(c.tolerance, 1e-300) > worst.error / max(worst.tolerance, 1e-300):
            worst = c
    return worst


def _symmetry(V: torch.Tensor, HV: torch.Tensor) -> float:
    sym = 0.0
    for i in range(V.shape[1]):
        for j in range(i + 1, V.shape[1]):
            a, b = torch.dot(V[:, i], HV[:, j]), torch.dot(V[:, j], HV[:, i])
            scale = max(float(HV[:, i].norm()), float(HV[:, j].norm()), 1e-300)
            sym = max(sym, float((a - b).abs()) / scale)
    return sym


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) / scale


def _dense_checks(op, tolerance: float):
    """Dense vs columns, and every block against the column-by-column finite-difference Hessian."""
    theta = op.objective.theta0
    H = BlockHessian(op.to_dense(), op.layout)
    cols = torch.stack([op @ e for e in torch.eye(op.shape[0], dtype=H.dense.dtype, device=theta.device)], 1)
    F, E, steps = fd_hessian_with_errors(_grad_fn(op.objective), theta)
    F, E = BlockHessian(F, op.layout), BlockHessian(E, op.layout)
    S = BlockHessian(torch.maximum(steps[:, None], steps[None, :]), op.layout)
    names = H.names
    details = {
        f"{r} / {c}": Comparison.of(H[r, c].double(), F[r, c], E[r, c], S[r, c], tolerance)
        for i, r in enumerate(names)
        for c in names[i:]
    }
    return _rel(H.dense, cols), details


def check(
    model,
    loss_fn,
    data,
    params=None,
    *,
    num_vectors: int = 3,
    seed: int = 0,
    dense_max_params: int = 200,
    tolerance: float = 1e-6,
    **options,
) -> CheckReport:
    """Check Hessian products, symmetry and (small P) the dense blocks on a float64 copy.

    Args:
        model: the network (a float64 copy is checked; the model is not changed).
        loss_fn: ``(outputs, targets) -> scalar``.
        data: an ``(inputs, targets)`` pair or a re-iterable of batches.
        params: names or globs of the parameters (default: all trainable).
        num_vectors: random directions for the product and symmetry checks.
        seed: seed of those directions.
        dense_max_params: build the dense and finite-difference Hessians when P ≤ this.
        tolerance: the relative error that always passes; a finite-difference comparison also
            passes within 10× the finite differences' own estimated error.
        **options: passed to ``HessianOperator`` (reduction, allow_random, method, ...).

    Returns:
        A ``CheckReport``; ``print(report)`` shows a small table, and each failed line says by
        how much and against what tolerance.

    Raises:
        InputError: a count, seed or tolerance that is not a number of the right kind.
    """
    num_vectors = _checks.as_int("num_vectors", num_vectors, minimum=1)
    seed = _checks.as_int("seed", seed)
    dense_max_params = _checks.as_int("dense_max_params", dense_max_params, minimum=0)
    tolerance = _checks.as_float("tolerance", tolerance, positive=True, below=1.0)
    op = _float64_problem(model, loss_fn, data, params, options)
    theta = op.objective.theta0
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(op.shape[0], max(2, num_vectors), generator=g, dtype=torch.float64).to(theta.device)
    V = V / V.norm(dim=0)
    hvp = _hvp_check(op, V, num_vectors, tolerance)
    sym = _symmetry(V, op @ V)
    dense_err, details = None, None
    if op.shape[0] <= dense_max_params:
        dense_err, details = _dense_checks(op, tolerance)
    blocks = {k: c.error for k, c in details.items()} if details is not None else None
    return CheckReport(
        hvp.error, sym, dense_err, blocks, op.shape[0], tolerance, hvp.step_max, hvp_detail=hvp, block_details=details
    )
