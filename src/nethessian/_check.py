"""``nh.check``: validate nethessian on the user's own model against finite differences.

Everything runs on a float64 copy of the model (the user's model is untouched):

* Hessian-vector products against central differences of the gradient,
  ``(g(θ + εv) − g(θ − εv)) / 2ε``, whose error is O(ε²) + O(u/ε) with u the
  unit roundoff; ε = u^(1/3) · max(1, ‖θ‖∞) balances the two;
* symmetry: ``uᵀ(Hv)`` against ``vᵀ(Hu)``;
* for small P, the dense Hessian against single-column products, and every
  named block against the finite-difference Hessian built column by column.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from ._dense import BlockHessian
from ._objective import Objective
from .operators._hessian import HessianOperator

__all__ = ["CheckReport", "check", "fd_hessian", "fd_step"]


def fd_step(theta: torch.Tensor) -> float:
    u = torch.finfo(torch.float64).eps
    return u ** (1 / 3) * max(1.0, float(theta.abs().max()))


def fd_hessian(objective: Objective, eps: Optional[float] = None) -> torch.Tensor:
    """Central-difference Hessian of ``objective`` (float64), column by column, symmetrised."""
    theta = objective.theta0.double()
    eps = fd_step(theta) if eps is None else eps
    P = theta.numel()
    H = torch.empty(P, P, dtype=torch.float64, device=theta.device)
    for i in range(P):
        e = torch.zeros_like(theta)
        e[i] = eps
        H[:, i] = (objective.gradient(theta + e).double() - objective.gradient(theta - e).double()) / (2 * eps)
    return 0.5 * (H + H.T)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) / scale


@dataclass(frozen=True)
class CheckReport:
    """Largest relative errors found by ``check`` (max-abs difference / max-abs value)."""

    hvp_vs_fd: float
    symmetry: float
    dense_vs_columns: Optional[float]
    blocks_vs_fd: Optional[Dict[str, float]]
    num_params: int
    tolerance: float
    eps: float
    passed: bool = field(init=False)

    def __post_init__(self):
        errs = [self.hvp_vs_fd, self.symmetry]
        errs += [self.dense_vs_columns] if self.dense_vs_columns is not None else []
        errs += list(self.blocks_vs_fd.values()) if self.blocks_vs_fd else []
        object.__setattr__(self, "passed", all(e <= self.tolerance for e in errs))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("hvp_vs_fd", "symmetry", "dense_vs_columns",
                                                "blocks_vs_fd", "num_params", "tolerance", "eps", "passed")}

    def __str__(self) -> str:
        lines = [f"nethessian check on P = {self.num_params} parameters (float64, ε = {self.eps:.2e})",
                 f"  Hessian-vector products vs finite differences : {self.hvp_vs_fd:.2e}",
                 f"  symmetry  |uᵀHv − vᵀHu| / scale               : {self.symmetry:.2e}"]
        if self.dense_vs_columns is not None:
            lines.append(f"  dense Hessian vs operator columns             : {self.dense_vs_columns:.2e}")
        for name, err in (self.blocks_vs_fd or {}).items():
            lines.append(f"  block {name:<40}: {err:.2e}")
        lines.append(f"  {'PASSED' if self.passed else 'FAILED'} (tolerance {self.tolerance:.0e})")
        return "\n".join(lines)


def check(model, loss_fn, data, params=None, *, num_vectors: int = 3, seed: int = 0,
          dense_max_params: int = 200, tolerance: float = 1e-6, **options) -> CheckReport:
    """Check Hessian products, symmetry and (small P) the dense blocks on a float64 copy.

    Args:
        model, loss_fn, data, params: the problem, as for ``nh.hessian``.
        num_vectors: random directions for the product and symmetry checks.
        seed: seed of those directions.
        dense_max_params: build the dense and finite-difference Hessians when P ≤ this.
        tolerance: the largest relative error that counts as passed.
        **options: passed to ``HessianOperator`` (reduction, allow_random, method, ...).

    Returns:
        A ``CheckReport``; ``print(report)`` shows a small table.
    """
    model64 = copy.deepcopy(model).double()
    if isinstance(loss_fn, torch.nn.Module):  # e.g. class weights of a cross-entropy
        loss_fn = copy.deepcopy(loss_fn).double()
    op = HessianOperator(model64, loss_fn, data, params, **options)
    obj = op.objective
    theta = obj.theta0
    eps = fd_step(theta)
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(op.shape[0], max(2, num_vectors), generator=g, dtype=torch.float64).to(theta.device)
    V = V / V.norm(dim=0)
    HV = op @ V
    hvp_err = 0.0
    for j in range(num_vectors):
        v = V[:, j]
        fd = (obj.gradient(theta + eps * v) - obj.gradient(theta - eps * v)) / (2 * eps)
        hvp_err = max(hvp_err, _rel(HV[:, j], fd))
    sym = 0.0
    for i in range(V.shape[1]):
        for j in range(i + 1, V.shape[1]):
            a, b = torch.dot(V[:, i], HV[:, j]), torch.dot(V[:, j], HV[:, i])
            scale = max(float(HV[:, i].norm()), float(HV[:, j].norm()), 1e-300)
            sym = max(sym, float((a - b).abs()) / scale)
    dense_err, blocks = None, None
    if op.shape[0] <= dense_max_params:
        H = BlockHessian(op.to_dense(), op.layout)
        cols = torch.stack([op @ e for e in torch.eye(op.shape[0], dtype=torch.float64, device=theta.device)], 1)
        dense_err = _rel(H.dense, cols)
        F = BlockHessian(fd_hessian(obj, eps), op.layout)
        names = H.names
        blocks = {f"{r} / {c}": _rel(H[r, c], F[r, c])
                  for i, r in enumerate(names) for c in names[i:]}
    return CheckReport(hvp_err, sym, dense_err, blocks, op.shape[0], tolerance, eps)
