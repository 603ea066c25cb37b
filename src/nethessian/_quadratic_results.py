"""The results of ``QuadraticModel``: ``QuadraticComparison`` (``compare``) and ``NewtonStep`` (``newton_step``).

Frozen dataclasses holding tensors, each with ``to_dict`` for JSON. Defined here and
re-exported by ``_quadratic.py`` (and the package) under their usual names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from .linalg._solve import SolveResult
from ._params import ParamLayout

__all__ = ["QuadraticComparison", "NewtonStep"]


def _floats(x) -> list:
    return [float(v) for v in x]


@dataclass(frozen=True, eq=False)
class QuadraticComparison:
    """True cost against the quadratic model along ``θ + α d``.

    ``true[i] = J(θ + alphas[i] d)``, ``model[i] = q(alphas[i] d)``, ``difference = true − model``
    (float64, CPU). ``slope`` is the least-squares slope of ``log|difference|`` against
    ``log|α|`` over the α ≠ 0 whose difference is above rounding (``nan`` with fewer than
    two): about 3 for a smooth cost (about 4 where the cubic term vanishes along ``d``).
    """

    alphas: torch.Tensor
    true: torch.Tensor
    model: torch.Tensor
    difference: torch.Tensor
    slope: float
    direction: str

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python types only, ready for ``json.dumps``."""
        return {
            "alphas": _floats(self.alphas),
            "true": _floats(self.true),
            "model": _floats(self.model),
            "difference": _floats(self.difference),
            "slope": float(self.slope),
            "direction": self.direction,
        }


@dataclass(frozen=True, eq=False)
class NewtonStep:
    """A (damped) Newton step ``d`` with ``(H + λI) d = −g``.

    Attributes:
        step: flat ``(P,)`` step (``step_by_name`` names it).
        predicted_decrease: ``J − q(d) = −(gᵀd + ½ dᵀHd)`` from the *undamped* model; negative
            when ``d`` goes uphill on the model (an indefinite ``H + λI`` solved by MINRES).
        damping: ``λ``.
        gradient_norm, step_norm: ``‖g‖`` and ``‖d‖``.
        positive_definite: ``True`` when CG solved it (no non-positive curvature of ``H + λI``
            met), ``False`` when CG met some (``negative_curvature_direction`` holds that unit
            direction; with ``method="auto"`` MINRES then made ``d``), ``None`` for ``method="minres"``.
        solve: the :class:`~nethessian.linalg._solve.SolveResult` that made ``d``.
        layout: the parameters' layout.
    """

    step: torch.Tensor
    predicted_decrease: float
    damping: float
    gradient_norm: float
    step_norm: float
    positive_definite: Optional[bool]
    solve: SolveResult
    layout: ParamLayout
    negative_curvature_direction: Optional[torch.Tensor] = None

    @property
    def converged(self) -> bool:
        return self.solve.converged

    @property
    def step_by_name(self) -> Dict[str, torch.Tensor]:
        return self.layout.unflatten(self.step)

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python types only, ready for ``json.dumps``."""
        return {
            "step": {n: t.detach().cpu().double().tolist() for n, t in self.step_by_name.items()},
            "predicted_decrease": self.predicted_decrease,
            "damping": self.damping,
            "gradient_norm": self.gradient_norm,
            "step_norm": self.step_norm,
            "positive_definite": self.positive_definite,
            "converged": self.converged,
            "solve": {k: v for k, v in self.solve.to_dict().items() if k not in ("x", "curvature_direction")},
        }
