"""InfluenceResult: what ``nh.influence`` returns (the scores of every training point and the solve's record).

The convention (scores, weights, ``removal_effect``, damping sensitivity) is set out in
``_influence.py``'s module docstring; ``_influence.py`` re-exports this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ._checks import as_int

__all__ = ["InfluenceResult"]


@dataclass(frozen=True, repr=False)
class InfluenceResult:
    """Influence scores of every training point on one test cost (see the module docstring).

    Attributes:
        scores: ``(N,)`` ``−∇ℓ_iᵀ (H + λI)⁻¹ ∇L_test`` in data order; < 0 helpful, > 0 harmful.
        weights: ``(N,)`` each sample's weight ``w_i`` in the training cost J.
        damping: the λ used.
        damping_sensitivity: ``‖d scores / d log λ‖ / ‖scores‖`` (0 when λ = 0).
        method: the solver used (``"cg"``, ``"minres"`` or ``"dense"``).
        converged, residual, iterations, num_matvecs: the solve of ``(H + λI)s = ∇L_test`` (true
            relative residual); H products in all (``P`` columns for ``"dense"``).
        min_eigenvalue, max_eigenvalue: of ``H`` (``"dense"`` only, else None).
        test_loss: ``L_test(θ̂)``.
    """

    scores: torch.Tensor
    weights: torch.Tensor
    damping: float
    damping_sensitivity: float
    method: str
    converged: bool
    residual: float
    iterations: int
    num_matvecs: int
    min_eigenvalue: Optional[float]
    max_eigenvalue: Optional[float]
    test_loss: float

    @property
    def removal_effect(self) -> torch.Tensor:  # ΔL_test ≈ −w_i score_i when sample i is left out
        return -self.weights * self.scores

    def helpful(self, k: int = 10) -> torch.Tensor:
        """Indices of the ``k`` most helpful samples (most negative scores first)."""
        return torch.argsort(self.scores)[: as_int("k", k, minimum=0)]

    def harmful(self, k: int = 10) -> torch.Tensor:
        """Indices of the ``k`` most harmful samples (most positive scores first)."""
        return torch.argsort(self.scores, descending=True)[: as_int("k", k, minimum=0)]

    def table(self, top: int = 10) -> str:
        """Text table of the ``top`` most helpful and most harmful samples."""
        rows = [f"{'':8} {'index':>7} {'score':>12} {'removal Δ L_test':>17}"]
        for label, idx in (("helpful", self.helpful(top)), ("harmful", self.harmful(top))):
            for i in idx.tolist():
                rows.append(f"{label:8} {i:>7} {float(self.scores[i]):12.4e} {float(self.removal_effect[i]):17.4e}")
        return "\n".join(rows)

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python types only, ready for ``json.dumps``."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {**d, "scores": self.scores.double().tolist(), "weights": self.weights.double().tolist()}

    def __repr__(self) -> str:
        conv = "converged" if self.converged else "NOT converged"
        return (
            f"InfluenceResult(N={self.scores.numel()}, damping={self.damping:g} "
            f"(sensitivity {self.damping_sensitivity:.2g}), {self.method} {conv}, "
            f"residual={self.residual:.1e}, matvecs={self.num_matvecs}, "
            f"scores in [{float(self.scores.min()):.3e}, {float(self.scores.max()):.3e}])"
        )
