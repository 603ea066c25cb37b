"""``EigenResult``: the eigenpairs ``nh.eigenvalues`` returns, with JSON and text views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .._params import ParamLayout
from ..errors import InputError

__all__ = ["EigenResult"]


@dataclass(frozen=True, eq=False)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: (k,) float64. Descending for ``"largest"``, descending in
            ``|λ|`` for ``"magnitude"``, ascending for ``"smallest"`` and ``"both"``.
        eigenvectors: (P, k) unit columns in the operator's dtype and device.
        residuals: (k,) float64, ``‖A v − λ v‖`` of each returned pair, recomputed
            with real products (true up to the rounding of one product, about
            ``eps·‖A‖`` in the operator's dtype).
        num_matvecs: every product with the operator, the symmetry check included.
        converged: whether every pair met ``tol`` on its recomputed residual: the bound
            ``min(r, r²/δ) ≤ tol · max(|θ|, √eps · max|θ|)``. What it guarantees: every
            returned ``θ`` is within ``r`` (its ``residuals`` entry) of an eigenvalue of the
            operator (for a symmetric matrix and a unit vector ``v``, some eigenvalue lies in
            ``[θ − ‖Av − θv‖, θ + ‖Av − θv‖]``; this part assumes nothing). The quadratic
            ``r²/δ`` is used only between two wanted Ritz values, with ``δ`` the distance to
            the neighbouring Ritz intervals ``θ_j ± r_j`` — it assumes no eigenvalue hides
            between them (the assumption of every Krylov "top-k"); at the edge of the wanted
            set it is never used, so there ``r ≤ tol·|θ|`` itself is required.
        layout: the operator's ``ParamLayout``, or ``None`` for a plain matrix.
        which: the end of the spectrum that was asked for.
        memory_bytes: the per-rank memory bound the run kept (basis and work vectors,
            beyond the products' own; see ``linalg._memory``), or ``None``.
        precision_note: the operator's half-precision caveat (how far its products
            can be trusted), or ``None`` when it computed in float32/float64.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    num_matvecs: int
    converged: bool
    layout: Optional[ParamLayout] = None
    which: str = "largest"
    memory_bytes: Optional[int] = None
    precision_note: Optional[str] = None

    def eigenvectors_by_name(self) -> List[Dict[str, torch.Tensor]]:
        """One ``{parameter name: tensor in its natural shape}`` dict per eigenvector."""
        if self.layout is None:
            raise InputError(
                "these eigenvectors have no parameter names: the operator was a plain "
                "matrix without a `layout`; use `.eigenvectors[:, i]` instead"
            )
        return [self.layout.unflatten(self.eigenvectors[:, i]) for i in range(self.eigenvectors.shape[1])]

    def to_dict(self, *, eigenvectors: bool = False) -> Dict[str, Any]:
        """JSON-ready dict (plain floats); eigenvectors only when asked (they are P x k)."""
        out: Dict[str, Any] = {
            "which": self.which,
            "eigenvalues": [float(x) for x in self.eigenvalues],
            "residuals": [float(x) for x in self.residuals],
            "num_matvecs": int(self.num_matvecs),
            "converged": bool(self.converged),
            "memory_bytes": self.memory_bytes,
            "precision_note": self.precision_note,
        }
        if self.layout is not None:
            out["parameters"] = list(self.layout.names)
        if eigenvectors:
            out["eigenvectors"] = self.eigenvectors.cpu().double().T.tolist()
        return out

    def split(self) -> str:
        """How ``k`` was split between the ends of the spectrum (``which="both"``).

        >>> r = EigenResult(torch.tensor([-1.0, 2.0, 3.0]), torch.eye(3), torch.zeros(3), 9, True, which="both")
        >>> r.split()
        'both: 1 smallest and 2 largest of k=3 (odd k: one more at the top)'
        """
        k = int(self.eigenvalues.numel())
        if self.which != "both":
            return f"{self.which}: k={k}"
        odd = " (odd k: one more at the top)" if k % 2 else ""
        return f"both: {k // 2} smallest and {k - k // 2} largest of k={k}{odd}"

    def table(self) -> str:
        """One line per pair: index, eigenvalue, residual."""
        lines = [f"{'#':>3}  {'eigenvalue':>14}  {'residual':>10}"]
        for i, (lam, r) in enumerate(zip(self.eigenvalues.tolist(), self.residuals.tolist())):
            lines.append(f"{i:>3}  {lam:>14.6g}  {r:>10.2e}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        vals = self.eigenvalues.tolist()
        shown = ", ".join(f"{x:.6g}" for x in vals[:8]) + (f", ... ({len(vals)} in all)" if len(vals) > 8 else "")
        which = self.split() if self.which == "both" else f"which={self.which!r}"
        return (
            f"EigenResult({which}, eigenvalues=[{shown}], max residual="
            f"{float(self.residuals.max()) if len(vals) else 0.0:.2e}, "
            f"num_matvecs={self.num_matvecs}, converged={self.converged}"
            + (f", precision_note={self.precision_note!r}" if self.precision_note else "")
            + ")"
        )
