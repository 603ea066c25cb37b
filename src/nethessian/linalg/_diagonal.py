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

from .. import distributed
from .._checkpoint import Checkpoint
from .._checks import as_int
from .._columns import identity_columns
from .._params import ParamLayout
from .._progress import Progress
from ..errors import CheckpointError, InputError
from ._memory import check_memory, diagonal_bytes, size_of
from ._operator import Operator, as_operator, make_generator, rademacher
from ._util import chunk_for, exact_engine, loaded_count, loaded_generator, loaded_tensor, resume

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
        engine: ``"structured"`` (second-order backpropagation, no products) or ``"autodiff"``.
        engine_reason: why that engine ran (for autodiff: the first unsupported module).
        memory_bytes: estimate: per-rank bound of the vectors held (``linalg._memory``).
        precision_note: the operator's half-precision caveat, or ``None``.
    """

    values: torch.Tensor
    stderr: Optional[torch.Tensor]
    num_matvecs: int
    method: str
    layout: Optional[ParamLayout] = None
    engine: str = "autodiff"
    engine_reason: Optional[str] = None
    memory_bytes: Optional[int] = None
    precision_note: Optional[str] = None

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
            "engine": self.engine,
            "engine_reason": self.engine_reason,
            "memory_bytes": self.memory_bytes,
            "precision_note": self.precision_note,
            "layout": None if lay is None else {"names": list(lay.names), "shapes": [list(s) for s in lay.shapes]},
        }

    def table(self) -> str:
        """One line per parameter block: name, size, mean entry, the median entry's standard error, range."""
        if self.layout is None:
            return _row("all", self.values, self.stderr)
        return "\n".join(
            _row(
                n, self.values[self.layout.slice(n)], None if self.stderr is None else self.stderr[self.layout.slice(n)]
            )
            for n in self.layout.names
        )

    def __repr__(self) -> str:
        v = self.values.double()
        return (
            f"DiagonalEstimate({self.method}, P={v.numel()}, values in [{float(v.min()):.4g}, "
            f"{float(v.max()):.4g}], sum={float(v.sum()):.6g}, num_matvecs={self.num_matvecs}"
            + (f", precision_note={self.precision_note!r}" if self.precision_note else "")
            + ")"
        )


def _row(name: str, values: torch.Tensor, stderr: Optional[torch.Tensor]) -> str:
    v = values.double()
    mean = float(v.mean()) if v.numel() else 0.0
    # per-entry errors are correlated across entries: report the typical one, not a block error
    err = "exact" if stderr is None else f"(entry stderr, median {float(stderr.double().median()):.2e})"
    return (
        f"{name}: {v.numel()} entries, mean {mean:.6g} {err}, "
        f"range [{float(v.min()) if v.numel() else 0.0:.4g}, {float(v.max()) if v.numel() else 0.0:.4g}]"
    )


def diagonal(
    op: Any,
    *,
    method: Literal["exact", "estimate"] = "exact",
    num_matvecs: Optional[int] = None,
    seed: Optional[int] = 0,
    chunk_size: Optional[int] = None,
    progress: Optional[bool] = None,
    checkpoint: Optional[Checkpoint] = None,
    engine: str = "auto",
    max_memory: Optional[int] = None,
) -> DiagonalEstimate:
    """Diagonal of a square operator, exactly or by the Bekas-Kokiopoulou-Saad estimator.

    Args:
        op: a curvature operator or a square tensor (anything with ``shape``,
            ``dtype``, ``device`` and ``@`` on ``(P, k)``).
        method: ``"exact"`` (``P`` products) or ``"estimate"`` (``num_matvecs``).
        num_matvecs: probes for ``"estimate"`` (default 100, at least 2).
        seed: seed of the CPU generator the probes are drawn from.
        chunk_size: columns per product ``A @ V``; default ``_columns.column_chunk``.
        progress: ``None`` auto, ``True``/``False`` (see ``nethessian._progress``).
        checkpoint: a ``Checkpoint``; state is saved as chunks finish and a run
            resumed from it gives the same result as an uninterrupted one. It is
            refused when made for another operator (its fingerprint), size or seed.
        engine: exact diagonal only: ``"auto"`` (second-order backpropagation when every
            module of a Hessian operator's model is supported, else autodiff),
            ``"structured"`` (refused, naming the module, when not supported) or
            ``"autodiff"`` (``P`` products). ``.engine``/``.engine_reason`` say which ran.
        max_memory: ``"estimate"``: refuse, before any product, a run whose memory bound
            (``memory_bytes`` of the result, see ``linalg._memory``) exceeds this many bytes.

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
        if A.sharded:
            raise InputError(
                "the exact diagonal multiplies identity columns and is not available on a "
                "sharded operator; use method='estimate'"
            )
        if num_matvecs is not None:
            raise InputError("num_matvecs applies to method='estimate' only; the exact diagonal takes P products")
        distributed.check_same("diagonal", method=method, chunk=chunk_for(A.size, A.size, chunk_size))
        structured, why = exact_engine(A.base, engine, checkpoint, "the exact diagonal")
        if structured is not None:
            return DiagonalEstimate(
                structured.diagonal().to(A.dtype),
                None,
                0,
                "exact",
                A.layout,
                "structured",
                why,
                precision_note=A.precision_note,
            )
        values = exact_diagonal(
            A, chunk_size=chunk_for(A.size, A.size, chunk_size), progress=progress, checkpoint=checkpoint
        )
        return DiagonalEstimate(
            values, None, A.size, "exact", A.layout, "autodiff", why, precision_note=A.precision_note
        )
    if engine not in ("auto", "autodiff"):
        raise InputError(f"engine={engine!r} applies to method='exact' only; the estimate takes products")
    m = 100 if num_matvecs is None else as_int("num_matvecs", num_matvecs)
    if m < 2:
        raise InputError(f"method='estimate' needs num_matvecs >= 2 for a standard error, got {m}")
    chunk = chunk_for(A.size, m, chunk_size)
    distributed.check_same("diagonal", method=method, num_matvecs=m, chunk=chunk)
    memory = check_memory(
        "diagonal(method='estimate')",
        diagonal_bytes(A.size, m, chunk, size_of(A.dtype)),
        max_memory,
        "lower chunk_size",
        A.device,
    )
    mean, var = _bks(A, m, seed, chunk, progress, checkpoint)
    stderr = (var / m).sqrt()
    return DiagonalEstimate(
        mean.to(A.dtype),
        stderr.to(A.dtype),
        m,
        "estimate",
        A.layout,
        memory_bytes=memory,
        precision_note=A.precision_note,
    )


def exact_diagonal(
    A: Operator, *, chunk_size: int, progress: Optional[bool] = None, checkpoint: Optional[Checkpoint] = None
) -> torch.Tensor:
    """``diag(A)`` from products with chunks of identity columns (``_columns.identity_columns``)."""
    return identity_columns(
        A.matmul,
        A.size,
        dtype=A.dtype,
        device=A.device,
        chunk=chunk_size,
        keep="diagonal",
        checkpoint=checkpoint,
        identity={"operator": A.key(checkpoint)},
        progress=progress,
        desc="diagonal",
    )


def _bks(A: Operator, m: int, seed, chunk: int, progress: bool, checkpoint) -> tuple:
    """Per-entry mean and sample variance of ``z ⊙ A z`` over ``m`` Rademacher probes (float64).

    Chunks are merged with Chan et al.'s pairwise update of (count, mean, M2),
    which keeps the variance accurate when it is small next to the mean.
    """
    P = A.size
    expect = {"kind": "diagonal-estimate", "operator": A.key(checkpoint), "size": P, "num_matvecs": m, "seed": seed}
    if A.sharded:
        expect.update(global_size=A.global_size, local_range=list(A.local_range))
    gen = make_generator(seed)
    n = 0
    mean = torch.zeros(P, dtype=torch.float64, device=A.device)
    m2 = torch.zeros_like(mean)
    state = resume(checkpoint, expect)
    if state is not None:
        n, mean, m2 = _loaded(state, P, m, gen, checkpoint.path)
        mean, m2 = mean.to(A.device), m2.to(A.device)
    with Progress(m, "diagonal (estimate)", unit="probe", enabled=progress, initial=n) as bar:
        while n < m:
            c = min(chunk, m - n)
            Z = rademacher(A, P, c, generator=gen)  # column by column: independent of the chunking
            X = (Z * (A @ Z)).double()
            cmean = X.mean(dim=1)
            cm2 = (X - cmean[:, None]).square().sum(dim=1)
            delta = cmean - mean
            mean = mean + delta * (c / (n + c))
            m2 = m2 + cm2 + delta.square() * (n * c / (n + c))
            n += c
            bar.update(c)
            if checkpoint is not None and (n == m or checkpoint.due()):
                checkpoint.save(
                    {**expect, "done": n, "mean": mean.cpu(), "m2": m2.cpu(), "generator": gen.get_state()}, force=True
                )
    return mean, m2 / (m - 1)


def _loaded(state, P: int, m: int, gen, path: str):
    """``done, mean, m2`` of a saved state, each checked (``CheckpointError``)."""
    n = loaded_count(state, "done", 0, m, path)
    mean = loaded_tensor(state, "mean", (P,), path).double()
    m2 = loaded_tensor(state, "m2", (P,), path).double()
    if bool((m2 < 0).any()):
        raise CheckpointError(
            f"{path!r}: the saved sums of squares are negative; the file is damaged, delete it to start over"
        )
    loaded_generator(state, gen, path)
    return n, mean, m2
