"""Diagonal of a square operator: exact (identity columns) or stochastic (Bekas et al.).

Exact:      diag(A)_i = e_iᵀ A e_i, read off ``A @ E`` for chunks ``E`` of identity
            columns, ``P`` products in all.
Estimated:  diag(A) ≈ (1/m) Σ_j z_j ⊙ A z_j with Rademacher ``z_j`` (so z ⊙ z = 1),
            unbiased, since E[z zᵀ] = I gives E[(z ⊙ Az)_i] = Σ_k A_ik E[z_i z_k] = A_ii.
            The per-entry standard error is the sample standard deviation / √m.

Reference: C. Bekas, E. Kokiopoulou, Y. Saad, "An estimator for the diagonal of a
matrix", Applied Numerical Mathematics 57 (2007) 1214-1229.

On a diagonal matrix both are exact (z ⊙ Dz = diag D for any sign vector z):

>>> import torch
>>> D = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
>>> diagonal(D).values.tolist()
[1.0, -2.0, 3.0]
>>> est = diagonal(D, method="estimate", num_matvecs=4)
>>> est.values.tolist(), est.stderr.tolist()
([1.0, -2.0, 3.0], [0.0, 0.0, 0.0])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import torch

from .._checkpoint import Checkpoint
from ..errors import InputError
from .._params import ParamLayout
from ._operator import Operator, as_operator, make_generator, rademacher
from ._util import _chunk, progress_bar, resume_state

__all__ = ["DiagonalEstimate", "diagonal"]



@dataclass(frozen=True)
class DiagonalEstimate:
    """The diagonal of an operator, flat in parameter order.

    Attributes:
        values: ``(P,)`` diagonal (exact or estimated), in the operator's dtype.
        stderr: ``(P,)`` per-entry standard error, or ``None`` when exact.
        num_matvecs: products spent (including those of a resumed checkpoint).
        method: ``"exact"`` or ``"estimate"``.
        layout: the operator's ``ParamLayout``, or ``None`` for a plain matrix.
    """

    values: torch.Tensor
    stderr: Optional[torch.Tensor]
    num_matvecs: int
    method: str
    layout: Optional[ParamLayout] = None

    @property
    def by_name(self) -> Dict[str, torch.Tensor]:
        """``{name: diagonal in the parameter's natural shape}``."""
        if self.layout is None:
            raise InputError(
                "by_name needs parameter names, but the operator had no .layout (a plain "
                "matrix); use .values, or pass a curvature operator built from a model"
            )
        return self.layout.unflatten(self.values)

    def to_dict(self) -> Dict[str, Any]:
        lay = self.layout
        return {
            "values": self.values.double().cpu().tolist(),
            "stderr": None if self.stderr is None else self.stderr.double().cpu().tolist(),
            "num_matvecs": self.num_matvecs,
            "method": self.method,
            "layout": None if lay is None else {"names": list(lay.names), "shapes": [list(s) for s in lay.shapes]},
        }


def diagonal(
    op: Any,
    *,
    method: Literal["exact", "estimate"] = "exact",
    num_matvecs: Optional[int] = None,
    seed: Optional[int] = 0,
    chunk_size: Optional[int] = None,
    progress: bool = False,
    checkpoint: Optional[Checkpoint] = None,
) -> DiagonalEstimate:
    """Diagonal of a square operator, exactly or by the Bekas-Kokiopoulou-Saad estimator.

    Args:
        op: a curvature operator or a square tensor (anything with ``shape``,
            ``dtype``, ``device`` and ``@`` on ``(P, k)``).
        method: ``"exact"`` (``P`` products) or ``"estimate"`` (``num_matvecs``).
        num_matvecs: probes for ``"estimate"`` (default 100, at least 2).
        seed: seed of the CPU generator the probes are drawn from.
        chunk_size: columns per product ``A @ V``; default keeps ``V`` under
            2**24 entries (``min(k, max(1, 2**24 // P))``).
        progress: show a tqdm bar on stderr.
        checkpoint: a ``Checkpoint``; state is saved after each chunk and a run
            resumed from it gives the same result as an uninterrupted one.

    Returns:
        A ``DiagonalEstimate``.

    Raises:
        InputError: unknown method, too few probes, bad chunk size.
        CheckpointError: the checkpoint holds another computation.
        NonFiniteError: a product returned NaN or Inf.
    """
    A = as_operator(op)
    if method not in ("exact", "estimate"):
        raise InputError(f"unknown diagonal method {method!r}; choose 'exact' or 'estimate'")
    if method == "exact":
        if num_matvecs is not None:
            raise InputError("num_matvecs applies to method='estimate' only; the exact diagonal takes P products")
        chunk = _chunk(A.size, A.size, chunk_size)
        values = exact_diagonal(A, chunk_size=chunk, progress=progress, checkpoint=checkpoint)
        return DiagonalEstimate(values, None, A.size, "exact", A.layout)
    m = 100 if num_matvecs is None else int(num_matvecs)
    if m < 2:
        raise InputError(f"method='estimate' needs num_matvecs >= 2 for a standard error, got {m}")
    mean, var = _bks(A, m, seed, _chunk(A.size, m, chunk_size), progress, checkpoint)
    stderr = (var / m).sqrt()
    return DiagonalEstimate(mean.to(A.dtype), stderr.to(A.dtype), m, "estimate", A.layout)


def exact_diagonal(
    A: Operator, *, chunk_size: int, progress: bool = False, checkpoint: Optional[Checkpoint] = None
) -> torch.Tensor:
    """``diag(A)`` from products with chunks of identity columns, in ``A``'s dtype."""
    P = A.size
    expect = {"kind": "diagonal-exact", "size": P}
    state = resume_state(checkpoint, expect)
    values = torch.zeros(P, dtype=A.dtype, device=A.device)
    done = 0
    if state is not None:
        done = int(state["done"])
        values = state["values"].to(device=A.device, dtype=A.dtype)
    bar = progress_bar(progress, P, "diagonal", done)
    while done < P:
        stop = min(P, done + chunk_size)
        rows = torch.arange(done, stop, device=A.device)
        cols = torch.arange(stop - done, device=A.device)
        E = torch.zeros(P, stop - done, dtype=A.dtype, device=A.device)
        E[rows, cols] = 1
        values[done:stop] = (A @ E)[rows, cols]
        bar.update(stop - done)
        done = stop
        if checkpoint is not None:
            checkpoint.save({**expect, "done": done, "values": values.cpu()}, force=done == P)
    bar.close()
    return values


def _bks(A: Operator, m: int, seed, chunk: int, progress: bool, checkpoint) -> tuple:
    """Per-entry mean and sample variance of ``z ⊙ A z`` over ``m`` Rademacher probes (float64).

    Chunks are merged with Chan et al.'s pairwise update of (count, mean, M2),
    which keeps the variance accurate when it is small next to the mean.
    """
    P = A.size
    expect = {"kind": "diagonal-estimate", "size": P, "num_matvecs": m, "seed": seed}
    gen = make_generator(seed)
    n = 0
    mean = torch.zeros(P, dtype=torch.float64, device=A.device)
    m2 = torch.zeros_like(mean)
    state = resume_state(checkpoint, expect)
    if state is not None:
        n, mean, m2 = int(state["done"]), state["mean"].to(A.device), state["m2"].to(A.device)
        gen.set_state(state["generator"])
    bar = progress_bar(progress, m, "diagonal (estimate)", n)
    while n < m:
        c = min(chunk, m - n)
        Z = rademacher(A, c, P, generator=gen).T  # drawn as (c, P): independent of the chunking
        X = (Z * (A @ Z)).double()
        cmean = X.mean(dim=1)
        cm2 = (X - cmean[:, None]).square().sum(dim=1)
        delta = cmean - mean
        mean = mean + delta * (c / (n + c))
        m2 = m2 + cm2 + delta.square() * (n * c / (n + c))
        n += c
        bar.update(c)
        if checkpoint is not None:
            state = {**expect, "done": n, "mean": mean.cpu(), "m2": m2.cpu(), "generator": gen.get_state()}
            checkpoint.save(state, force=n == m)
    bar.close()
    return mean, m2 / (m - 1)
