"""Trace of a square operator: exact, Hutchinson, Hutch++ and XTrace.

Every method is written as a ``(P, s)`` table of *row contributions* whose column
sums are ``s`` unbiased samples of tr(A); the estimate is their mean and the
standard error their sample standard deviation / √s. Summing rows over a
parameter block instead gives, from the same products, samples of the trace of
that diagonal block (``by_block=True``); the block traces add up to the total.
Tables are reduced to these sums as soon as they are formed. None of the
estimators needs symmetry: each is unbiased for any square operator.

For the sketching methods, with Π the projector onto the sketch and
r = (I-Π)z the deflated probe (E[r rᵀ] = I-Π; for XTrace after the scaling
c_i below), a block B (coordinate projector
P_B) splits as tr(P_B A) = tr(P_B A Π) + tr(P_B A (I-Π)): the first term is the
exact row sum of diag(AΠ) over B, the second is estimated without bias by
r_Bᵀ (A r)_B. Over all rows these are tr(ΠAΠ) and rᵀAr, the usual estimator.

* exact:      tr(A) = Σ_i e_iᵀ A e_i (``P`` products, one "sample", stderr 0).
* Hutchinson: tr(A) ≈ (1/m) Σ_j z_jᵀ A z_j, Rademacher z_j.
  M. F. Hutchinson (1989), Commun. Stat. Simul. Comput. 18(3) 1059-1076.
* Hutch++:    with Q = orth(A S), S of k = ⌊m/3⌋ Rademacher columns,
  tr(A) = tr(QᵀAQ) + tr((I-QQᵀ)A(I-QQᵀ)), the second term by Hutchinson on
  g = m - 2k deflated probes (I-QQᵀ)z. The standard error is the Hutchinson one
  of the deflated part: honest given Q, since tr(QᵀAQ) is then exact.
  R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: optimal stochastic
  trace estimation", SOSA 2021.
* XTrace:     with n = ⌊m/2⌋ probes ω_i (uniform on the sphere of radius √P) and
  Q_i an orthonormal basis of A Ω_{-i}, the exchangeable mean of
  tr(Q_iᵀAQ_i) + c_i ω_iᵀ(I-Q_iQ_iᵀ)A(I-Q_iQ_iᵀ)ω_i, c_i = (P-n+1)/‖(I-Q_iQ_iᵀ)ω_i‖²,
  computed from one QR, A Ω = QR, by downdating: Q_iQ_iᵀ = Q(I - s_i s_iᵀ)Qᵀ with
  s_i the normalised i-th row of R⁻¹. Standard error: std of the n terms / √n
  (the paper's estimate; the terms are correlated, so it is optimistic when n
  approaches P). When A Ω is rank deficient (rank A < n) or n > P, the sketch
  holds range(A) and tr(QᵀAQ) is returned as exact, stderr 0.
  E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace: making the most of every
  sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45 (2024).

Rademacher probes make Hutchinson exact on a diagonal matrix (zᵀDz = tr D):

>>> import torch
>>> D = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
>>> trace(D, exact=True).value
10.0
>>> est = trace(D, method="hutchinson", num_matvecs=6)
>>> est.value, est.stderr, est.num_matvecs
(10.0, 0.0, 6)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Literal, Optional

import torch

from .. import distributed
from .._checks import as_int
from .._params import ParamLayout
from .._progress import Progress
from ..errors import InputError
from ._diagonal import exact_diagonal
from ._operator import Operator, as_operator, make_generator, rademacher, randn
from ._memory import check_memory, size_of, trace_bytes
from ._accumulate import column_sums
from ._ortho import orthonormal_columns, project_out
from ._probes import Products
from ._util import chunk_for, exact_engine

__all__ = ["TraceEstimate", "trace"]

Method = Literal["hutchinson", "hutch++", "xtrace"]
_MIN_MATVECS = {"hutchinson": 2, "hutch++": 4, "xtrace": 4}
_WHY_MIN = {
    "hutchinson": "2 probes for a standard error",
    "hutch++": "1 sketch column, its product, and 2 deflated probes for a standard error",
    "xtrace": "2 probes and 2 basis products for a standard error",
}


@dataclass(frozen=True, repr=False)
class TraceEstimate:
    """An estimate of tr(A) with its standard error.

    Attributes:
        value: the estimate (exact when ``method == "exact"``).
        stderr: its standard error (0 when exact).
        num_matvecs: products spent.
        method: ``"exact"``, ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        blocks: with ``by_block=True``, ``{name: TraceEstimate}`` of each diagonal
            block (their values sum to ``value``); otherwise ``None``.
        engine: exact trace only: ``"structured"`` (second-order backpropagation) or
            ``"autodiff"`` (products); ``engine_reason`` says why.
        memory_bytes: estimates: per-rank bound of the vectors held (``linalg._memory``).
        precision_note: the operator's half-precision caveat, or ``None``.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str
    blocks: Optional[Dict[str, "TraceEstimate"]] = None
    engine: str = "autodiff"
    engine_reason: Optional[str] = None
    memory_bytes: Optional[int] = None
    precision_note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "memory_bytes": self.memory_bytes,
            "precision_note": self.precision_note,
            "value": self.value,
            "stderr": self.stderr,
            "num_matvecs": self.num_matvecs,
            "method": self.method,
            "engine": self.engine,
            "engine_reason": self.engine_reason,
        }
        out["blocks"] = None if self.blocks is None else {k: b.to_dict() for k, b in self.blocks.items()}
        return out

    def table(self) -> str:
        """One line per block (and the total): name, value, standard error."""
        rows = [("total", self)] + list((self.blocks or {}).items())
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {est.value:>14.6g}  ± {est.stderr:.2e}" for name, est in rows)

    def __repr__(self) -> str:
        blocks = "" if self.blocks is None else f", {len(self.blocks)} blocks (see .table())"
        note = f", precision_note={self.precision_note!r}" if self.precision_note else ""
        return (
            f"TraceEstimate({self.value:.6g} ± {self.stderr:.2g}, method={self.method!r}, "
            f"num_matvecs={self.num_matvecs}{blocks}{note})"
        )


def trace(
    op: Any,
    *,
    method: Method = "hutch++",
    num_matvecs: Optional[int] = None,
    seed: Optional[int] = 0,
    exact: bool = False,
    by_block: bool = False,
    chunk_size: Optional[int] = None,
    progress: Optional[bool] = None,
    checkpoint: Any = None,
    engine: str = "auto",
    max_memory: Optional[int] = None,
) -> TraceEstimate:
    """Trace of a square operator, exact or estimated with a standard error.

    Args:
        op: a curvature operator or a square tensor.
        method: ``"hutchinson"``, ``"hutch++"`` (default) or ``"xtrace"``.
        num_matvecs: product budget (default 90). Minimum 2 for Hutchinson, 4
            for Hutch++ and XTrace; XTrace uses an even number (⌊m/2⌋ · 2).
        seed: seed of the CPU generator the probes are drawn from.
        exact: sum the exact diagonal instead (``P`` products; ``method`` and
            ``num_matvecs`` are then ignored).
        engine: with ``exact=True``: ``"auto"`` (second-order backpropagation when the
            model is supported, no products), ``"structured"`` or ``"autodiff"``; see
            ``nh.diagonal``.
        by_block: also return the trace of each named diagonal block ("per-layer
            sharpness"); needs an operator with a ``.layout``.
        chunk_size: columns per product ``A @ V`` (default ``_columns.column_chunk``).
        progress: ``None`` auto, ``True``/``False`` (see ``nethessian._progress``).
        checkpoint: a ``Checkpoint``; finished products (or their reduced sums) are
            saved as they come and a resumed run gives the same estimate without
            redoing them. Refused when made for another operator, method, budget or seed.
        max_memory: refuse, before any product, an estimate whose memory bound
            (``memory_bytes`` of the result, see ``linalg._memory``) exceeds this many bytes.

    Returns:
        A ``TraceEstimate``.

    Raises:
        InputError: unknown method, too small a budget, ``by_block`` without layout.
        NonFiniteError: a product returned NaN or Inf.
        CheckpointError: the checkpoint holds another computation or is damaged.
    """
    A = as_operator(op)
    layout = _block_layout(A) if by_block else None
    if not isinstance(exact, bool):
        raise InputError(f"exact must be True or False, got {exact!r}")
    if exact:
        _unsharded(A, "trace(exact=True)")
        distributed.check_same("trace", exact=True, chunk=chunk_for(A.size, A.size, chunk_size))
        structured, why = exact_engine(A.base, engine, checkpoint, "the exact trace")
        if structured is not None:  # second-order backpropagation: no products
            values = structured.diagonal().to(A.dtype)
            return replace(
                _summarise(_reduce(A, values[:, None], None, layout), 0, "exact", layout),
                engine="structured",
                engine_reason=why,
                precision_note=A.precision_note,
            )
        values = exact_diagonal(
            A, chunk_size=chunk_for(A.size, A.size, chunk_size), progress=progress, checkpoint=checkpoint
        )
        return replace(
            _summarise(_reduce(A, values[:, None], None, layout), A.size, "exact", layout),
            engine_reason=why,
            precision_note=A.precision_note,
        )
    if engine not in ("auto", "autodiff"):
        raise InputError(f"engine={engine!r} applies to exact=True only; estimates take products")
    m = _budget(method, num_matvecs)
    chunk = chunk_for(A.size, m, chunk_size)
    distributed.check_same("trace", method=method, num_matvecs=m, by_block=bool(by_block), chunk=chunk)
    memory = check_memory(
        f"trace(method={method!r})",
        trace_bytes(method, A.size, m, chunk, size_of(A.dtype)),
        max_memory,
        "lower num_matvecs or chunk_size",
        A.device,
    )
    gen = make_generator(seed)
    expect = {
        "kind": f"trace-{method}",
        "operator": A.key(checkpoint),
        "size": A.size,
        "num_matvecs": m,
        "seed": seed,
        "by_block": bool(by_block),
    }
    if A.sharded:
        expect.update(global_size=A.global_size, local_range=list(A.local_range))
    spend = 2 * (m // 2) if method == "xtrace" else m
    with Progress(spend, f"trace ({method})", enabled=progress) as bar:
        prods = Products(A, chunk, checkpoint, expect, bar)
        sums = _SAMPLES[method](A, m, gen, prods, layout)
    return replace(
        _summarise(sums, prods.num_matvecs, method, layout), memory_bytes=memory, precision_note=A.precision_note
    )


def _unsharded(A: Operator, what: str) -> None:
    if A.sharded:
        raise InputError(
            f"{what} multiplies identity columns and is not available on a sharded operator; "
            "use an estimate (method='hutch++', 'hutchinson' or 'xtrace')"
        )


def _budget(method: str, num_matvecs: Optional[int]) -> int:
    if method not in _MIN_MATVECS:
        raise InputError(f"unknown trace method {method!r}; choose one of {', '.join(map(repr, _MIN_MATVECS))}")
    m = 90 if num_matvecs is None else as_int("num_matvecs", num_matvecs)
    if m < _MIN_MATVECS[method]:
        raise InputError(f"method={method!r} needs num_matvecs >= {_MIN_MATVECS[method]} ({_WHY_MIN[method]}), got {m}")
    return m


def _block_layout(A: Operator) -> ParamLayout:
    if A.sharded:
        raise InputError(
            "by_block=True is not available on a sharded operator (each rank holds a slice "
            "of the parameter blocks); ask for the total trace"
        )
    layout = A.layout
    if layout is None:
        raise InputError(
            "by_block=True needs an operator with a .layout (a ParamLayout naming the "
            "parameter blocks); a plain matrix has none"
        )
    if layout.size != A.size:
        raise InputError(f"the operator's layout covers {layout.size} entries but the operator has size {A.size}")
    return layout


# ---------------------------------------------------------------- row tables


def _reduce(A: Operator, X: torch.Tensor, Y: Optional[torch.Tensor], layout: Optional[ParamLayout]) -> torch.Tensor:
    """Column sums of the (P, s) row table ``X ⊙ Y`` (``X`` when ``Y`` is None), float64, over all ranks.

    (1, s); or per block, (num_blocks, s). Accumulated without a float64 copy of the table.
    """
    if layout is None:
        return A.allreduce_(column_sums(X, Y)[None])
    return torch.stack([column_sums(X[sl], None if Y is None else Y[sl]) for sl in map(layout.slice, layout.names)])


def _products(prods: Products, label: str, V: torch.Tensor) -> torch.Tensor:
    """``A V`` (float64) for a block ``V`` held in memory, through the resumable product loop."""
    return prods.run(label, V.shape[1], V.shape[0], lambda a, b: V[:, a:b], lambda _, AV: AV)


def _hutchinson_samples(A: Operator, m: int, gen, prods: Products, layout) -> torch.Tensor:
    """Rows z ⊙ Az, drawn, applied and reduced one chunk of probes at a time."""
    rows = 1 if layout is None else len(layout.names)

    def draw(start: int, stop: int) -> torch.Tensor:  # column by column: independent of the chunking
        return rademacher(A, A.size, stop - start, generator=gen)

    return prods.run("hutchinson", m, rows, draw, lambda Z, AZ: _reduce(A, Z, AZ, layout))


def _hutchpp_samples(A: Operator, m: int, gen, prods: Products, layout) -> torch.Tensor:
    """Hutch++ samples, (rows, g): the exact tr(P_B A QQᵀ) plus z̃_Bᵀ (A z̃)_B, z̃ = (I-QQᵀ)z.

    Memory (``linalg._memory``): the sketch A S, orthonormalised in place into Q, in the
    working dtype (float32 for a half-precision operator); S, the basis products and the
    deflated probes go a chunk at a time, each reduced to per-block sums as it is formed.
    The checkpoint's ``"sketch"`` block is that same tensor: once Q is formed it holds Q,
    which orthonormalises to itself on a resumed run.
    """
    k, g = m // 3, m - 2 * (m // 3)
    work = _work_dtype(A.dtype)
    rows = 1 if layout is None else len(layout.names)

    def signs(start: int, stop: int) -> torch.Tensor:  # column by column: independent of the chunking
        return rademacher(A, A.size, stop - start, generator=gen)

    Q = prods.run("sketch", k, A.size, signs, lambda _, AS: AS, dtype=work)
    orthonormal_columns(A, Q, rtol=_RANK_RTOL * k, inplace=True)  # a vanished column stays 0: QQᵀ a projector
    exact = prods.run(
        "basis", k, rows, lambda a, b: Q[:, a:b].to(A.dtype), lambda V, AV: _reduce(A, V, AV, layout)
    ).sum(dim=1, keepdim=True)  # per block: the rows of diag(A QQᵀ), summing to tr(QᵀAQ)

    def deflated(start: int, stop: int) -> torch.Tensor:
        G = signs(start, stop).to(work)
        return project_out(A, Q, G, passes=2, inplace=True)[0].to(A.dtype)

    return exact + prods.run("deflated", g, rows, deflated, lambda V, AV: _reduce(A, V, AV, layout))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where kept vectors and elementwise products live: the operator's dtype, float32 for half precision."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _xtrace_samples(A: Operator, m: int, gen, prods: Products, layout) -> torch.Tensor:
    """Rows of XTrace, (P, n) with n = ⌊m/2⌋: column i sums to the i-th exchangeable term."""
    P, n = A.global_size, m // 2
    Om = randn(A, A.size, n, generator=gen, dtype=torch.float64)
    Om = (Om * (math.sqrt(P) / A.col_norms(Om).to(Om.device))).to(A.dtype)  # uniform on the sphere of radius √P
    Y = _products(prods, "sketch", Om)
    Om = Om.double()
    Q, R = orthonormal_columns(A, Y, rtol=_RANK_RTOL * n)
    Z = _products(prods, "basis", Q.to(A.dtype))
    if _sketch_is_complete(R, n, P):  # range(A) ⊂ range(Q): tr(A) = tr(QᵀAQ) exactly
        return _reduce(A, Q, Z, layout).sum(dim=1, keepdim=True)
    return _reduce(A, _xtrace_table(A, Om, Y, Q, R.to(Q.device), Z), None, layout)


def _sketch_is_complete(R: torch.Tensor, n: int, P: int) -> bool:
    """More probes than dimensions, or A Ω numerically rank deficient (then rank A < n)."""
    if n > P:
        return True
    d = R.diagonal().abs()
    return bool(d.min() <= 10 * n * torch.finfo(torch.float64).eps * d.max())


def _xtrace_table(A: Operator, Om, Y, Q, R, Z) -> torch.Tensor:
    """XTrace rows with Π_i = Q(I - s_i s_iᵀ)Qᵀ, r_i = (I - Π_i)ω_i (all float64).

    Row j, column i: the exact part diag(A Π_i)_j = Z_j·Q_j - (Z_j·s_i)(Q_j·s_i)
    (Z = AQ), which sums to tr(QᵀAQ) - s_iᵀ(QᵀAQ)s_i over j, plus the scaled
    residual c_i (r_i)_j (A r_i)_j with A r_i = Y_i - Z (I - s_i s_iᵀ) Qᵀω_i.
    """
    P, n = A.global_size, Om.shape[1]
    S = torch.linalg.solve_triangular(R, torch.eye(n, dtype=R.dtype, device=R.device), upper=True).T
    S = S / S.norm(dim=0)  # column i: s_i ⟂ R_j (j ≠ i)
    W = A.dot(Q, Om)
    sw = (S * W).sum(dim=0)  # s_iᵀ w_i
    exact = (Q * Z).sum(dim=1, keepdim=True) - (Q @ S) * (Z @ S)
    V = W - S * sw  # (I - s_i s_iᵀ) w_i
    r = Om - Q @ V
    Ar = Y - Z @ V
    return exact + (P - n + 1) / A.col_norms(r).square().to(r.device) * r * Ar


_RANK_RTOL = 10 * torch.finfo(torch.float64).eps  # x columns: a sketch column inside the span of the others

_SAMPLES = {"hutchinson": _hutchinson_samples, "hutch++": _hutchpp_samples, "xtrace": _xtrace_samples}


# ---------------------------------------------------------------- summaries


def _estimate(samples: torch.Tensor, num_matvecs: int, method: str) -> TraceEstimate:
    s = samples.shape[0]
    value = float(samples.mean())
    stderr = float(samples.std(correction=1)) / math.sqrt(s) if s > 1 else 0.0
    return TraceEstimate(value, stderr, num_matvecs, method)


def _summarise(sums: torch.Tensor, num_matvecs: int, method: str, layout: Optional[ParamLayout]) -> TraceEstimate:
    """Mean and standard error of the samples: ``sums`` is (1, s), or (num_blocks, s) per block."""
    total = _estimate(sums.sum(dim=0), num_matvecs, method)
    if layout is None:
        return total
    blocks = {name: _estimate(sums[i], num_matvecs, method) for i, name in enumerate(layout.names)}
    return TraceEstimate(total.value, total.stderr, num_matvecs, method, blocks)
