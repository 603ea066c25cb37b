"""The report's structure sections: block eigenvalues, eigenvector mass, GGN, input Hessian.

Per-block top eigenvalues, where the top eigenvectors live, GGN against Hessian, and
the Hessian with respect to the inputs.

Every function takes the problem's one Hessian operator (``q.operator``) and, in dense
mode, the formed matrix, so nothing is computed twice:

* ``blocks``: for each parameter b, λ_max(H_bb) of the diagonal block
  ``H_bb = P_bᵀ H P_b`` (``P_b`` the columns of the identity on b's coordinates). Dense:
  ``eigvalsh`` of the slice. Matrix-free: the block as an operator ``v_b ↦ (H [0; v_b; 0])_b``
  (zero padding, one product of H per block product); formed with ``n_b`` products when
  ``n_b ≤ BLOCK_DENSE_MAX``, else thick-restart Lanczos (k = 1).
* ``eigenvectors``: for each top eigenvector v (unit), ``m_b = ‖v_b‖² / ‖v‖²`` per parameter
  (Σ_b m_b = 1) and summed per layer (the module owning the parameter). No product.
* ``ggn``: the top eigenvalues of G (``GGNOperator``) and of H, and the relative size of the
  residual term ``‖(H − G) v‖ / ‖H v‖`` on the top Hessian eigenvector and ``NUM_RANDOM``
  random unit vectors.
* ``input-hessian``: ``nh.input_hessian``'s per-sample top eigenvalue and trace.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch

from ..errors import InputError

__all__ = [
    "BLOCK_DENSE_MAX",
    "NUM_RANDOM",
    "block_top_eigenvalues",
    "eigenvector_mass",
    "ggn_vs_hessian",
    "structure",
    "input_hessian_section",
    "layer_of",
    "lanczos_ncv",
    "planned_extra",
]

#: blocks up to this many entries are formed (n_b products) rather than run through Lanczos
BLOCK_DENSE_MAX = 40
#: random unit vectors on which the GGN residual ‖(H − G) v‖ / ‖H v‖ is measured (plus the top eigenvector)
NUM_RANDOM = 3


def lanczos_ncv(S: Dict[str, Any], k: int, n: int) -> int:
    """The Lanczos basis of a run for ``k`` pairs of an ``n``-dimensional operator.

    The report's ``ncv`` setting, else ``nh.eigenvalues``' default (``max(2k + 1, 20)``), at most ``n``.
    """
    return min(S.get("ncv") or max(2 * k + 1, 20), n)


def layer_of(name: str) -> str:
    """The module owning a parameter: ``"0.weight"`` → ``"0"``; a top-level parameter is its own layer."""
    return name.rsplit(".", 1)[0] if "." in name else name


def planned_extra(P: int, numels, S: Dict[str, Any], dense: bool, input_dim: Optional[int]) -> tuple:
    """(fewest, most) products of the structure sections: Hessian products plus GGN products.

    Lanczos bounds follow the report's rule: ``ncv`` products at least, ``20·ncv`` at most.
    """
    want, lo, hi = set(S["sections"]), 0, 0
    if "blocks" in want and not dense:
        for n in numels:
            if n <= BLOCK_DENSE_MAX:
                lo, hi = lo + n, hi + n
            else:
                ncv = lanczos_ncv(S, 1, n)
                lo, hi = lo + ncv, hi + 20 * ncv
    if "ggn" in want:
        if dense:
            lo, hi = lo + P, hi + P
        else:
            ncv = lanczos_ncv(S, min(S["num_eigs"], P - 1), P)
            lo, hi = lo + ncv + 2 * (NUM_RANDOM + 1), hi + 20 * ncv + 2 * (NUM_RANDOM + 1)
    if "input-hessian" in want and input_dim:
        lo, hi = lo + input_dim, hi + input_dim
    return lo, hi


# ----------------------------------------------------------------------------- blocks
class BlockOperator:
    """``H_bb``: the Hessian restricted to one parameter's coordinates, ``v_b ↦ (H P_b v_b)_b``."""

    def __init__(self, op, start: int, size: int):
        self.op, self.start, self.size = op, start, size
        self.shape, self.dtype, self.device = (size, size), op.dtype, op.device

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        one = V.ndim == 1
        V = V[:, None] if one else V
        full = torch.zeros(self.op.shape[0], V.shape[1], dtype=self.op.dtype, device=self.op.device)
        full[self.start : self.start + self.size] = V.to(full)
        out = (self.op @ full)[self.start : self.start + self.size]
        return out[:, 0] if one else out


def block_top_eigenvalues(q, S: Dict[str, Any], dense_H: Optional[torch.Tensor]) -> Dict[str, Any]:
    """λ_max of each diagonal block H_bb, by parameter name, with how it was computed."""
    lay, out = q.layout, {}
    for name, start, n in zip(lay.names, lay.offsets, lay.numels):
        if dense_H is not None:
            block = dense_H[start : start + n, start : start + n]
            out[name] = {
                "numel": n,
                "top_eigenvalue": float(torch.linalg.eigvalsh(block.double())[-1]),
                "method": "dense block",
                "num_matvecs": 0,
            }
        elif n <= BLOCK_DENSE_MAX:
            B = BlockOperator(q.operator, start, n)
            M = B @ torch.eye(n, dtype=B.dtype, device=B.device)
            out[name] = {
                "numel": n,
                "top_eigenvalue": float(torch.linalg.eigvalsh((0.5 * (M + M.T)).double())[-1]),
                "method": "formed block",
                "num_matvecs": n,
            }
        else:
            r = _lanczos(BlockOperator(q.operator, start, n), 1, "largest", S["seed"], lanczos_ncv(S, 1, n))
            out[name] = {
                "numel": n,
                "top_eigenvalue": float(r.eigenvalues[0]),
                "method": "Lanczos",
                "num_matvecs": r.num_matvecs,
                "converged": bool(r.converged),
                "residual": float(r.residuals[0]),
            }
    return out


def _lanczos(op, k: int, which: str, seed: int, ncv: int):
    from ..linalg._lanczos import eigenvalues

    with warnings.catch_warnings():  # non-convergence is shown on the page
        warnings.simplefilter("ignore", UserWarning)
        return eigenvalues(op, k=k, which=which, tol=1e-3, seed=seed, progress=False, ncv=ncv)


# ----------------------------------------------------------------------------- eigenvectors
def eigenvector_mass(layout, vectors: torch.Tensor, values: torch.Tensor) -> List[Dict[str, Any]]:
    """For each column v of ``vectors``: ``‖v_b‖² / ‖v‖²`` per parameter and per layer (each sums to 1)."""
    out = []
    V = vectors.detach().double().cpu()
    for i in range(V.shape[1]):
        v = V[:, i]
        total = float(v.square().sum()) or 1.0
        by_param = {
            n: float(v[s : s + k].square().sum()) / total
            for n, s, k in zip(layout.names, layout.offsets, layout.numels)
        }
        by_layer: Dict[str, float] = {}
        for n, m in by_param.items():
            by_layer[layer_of(n)] = by_layer.get(layer_of(n), 0.0) + m
        out.append({"eigenvalue": float(values[i]), "by_parameter": by_param, "by_layer": by_layer})
    return out


# ----------------------------------------------------------------------------- GGN
def ggn_vs_hessian(
    problem, q, S: Dict[str, Any], top_H: torch.Tensor, top_vec: torch.Tensor, dense_H: Optional[torch.Tensor]
) -> Dict[str, Any]:
    """Top eigenvalues of G and H and ``‖(H − G) v‖ / ‖H v‖`` on the top eigenvector and random vectors.

    ``top_H`` are H's largest eigenvalues (descending), ``top_vec`` its top eigenvector.
    """
    from ..operators._ggn import GGNOperator

    try:
        G = GGNOperator.from_objective(q.objective)  # the Hessian's objective: one per problem
    except InputError as exc:
        return {"error": " ".join(str(exc).split())}
    P, k = q.layout.size, int(top_H.numel())
    g = torch.Generator().manual_seed(int(S["seed"]) + 7)
    R = torch.randn(P, NUM_RANDOM, generator=g, dtype=torch.float64)
    V = torch.cat([top_vec.detach().double().cpu()[:, None], R / R.norm(dim=0)], dim=1)
    if dense_H is not None:
        Gd = G.to_dense(progress=False).double()
        Gd = 0.5 * (Gd + Gd.T)
        top_G = torch.linalg.eigvalsh(Gd).flip(0)[:k].cpu()
        Hd = dense_H.double().cpu()
        HV, GV, method, n_g = Hd @ V, Gd.cpu() @ V, "dense", P
    else:
        r = _lanczos(G, k, "largest", S["seed"], lanczos_ncv(S, k, P))
        top_G, method = r.eigenvalues.cpu(), "thick-restart Lanczos"
        Vd = V.to(device=q.operator.device, dtype=q.operator.dtype)
        HV = (q.operator @ Vd).double().cpu()
        GV = (G @ Vd).double().cpu()
        n_g = r.num_matvecs + V.shape[1]
    rel = ((HV - GV).norm(dim=0) / HV.norm(dim=0).clamp_min(1e-300)).tolist()
    names = ["top Hessian eigenvector"] + [f"random unit vector {i + 1}" for i in range(NUM_RANDOM)]
    return {
        "method": method,
        "hessian_top": [float(x) for x in top_H],
        "ggn_top": [float(x) for x in top_G],
        "residual": [{"vector": n, "relative": float(x)} for n, x in zip(names, rel)],
        "ggn_matvecs": int(n_g),
        "ggn_engine": G.engine,
    }


# ----------------------------------------------------------------------------- inputs
def input_dim(objective) -> Optional[int]:
    """Entries of one sample of the first batch's inputs (one tensor), else ``None`` (not known up front)."""
    x = objective.data.first().inputs
    return int(x[0].numel()) if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] else None


def input_hessian_section(problem, q) -> Dict[str, Any]:
    """``nh.input_hessian`` on the problem: per-sample top eigenvalue and trace (or why it cannot run)."""
    from .._input_hessian import input_hessian

    try:
        R = input_hessian(problem.model, problem.loss_fn, problem.data, params=list(q.layout.names))
    except InputError as exc:
        return {"error": " ".join(str(exc).split())}
    return R.to_dict()


# ----------------------------------------------------------------------------- all of them
def structure(q, S: Dict[str, Any], stages, ctx: Dict[str, Any], problem, R: Dict[str, Any], want) -> None:
    """Fill ``R["blocks"]``, ``R["eigenvectors"]``, ``R["ggn"]``, ``R["input_hessian"]`` (``None`` when not chosen).

    ``ctx`` holds what the eigenvalue stage already has: ``top_values`` (descending),
    ``top_vectors`` (columns) and, in dense mode, the formed ``H``.
    """
    H = ctx.get("H")
    R["blocks"] = (
        stages("top eigenvalue of each diagonal block", lambda: block_top_eigenvalues(q, S, H))
        if "blocks" in want
        else None
    )
    R["eigenvectors"] = (
        eigenvector_mass(q.layout, ctx["top_vectors"], ctx["top_values"]) if "eigenvectors" in want else None
    )
    R["ggn"] = (
        stages(
            "GGN against Hessian", lambda: ggn_vs_hessian(problem, q, S, ctx["top_values"], ctx["top_vectors"][:, 0], H)
        )
        if "ggn" in want
        else None
    )
    R["input_hessian"] = (
        stages("Hessian w.r.t. the inputs", lambda: input_hessian_section(problem, q))
        if "input-hessian" in want
        else None
    )
