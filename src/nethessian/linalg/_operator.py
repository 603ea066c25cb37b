"""What every estimator accepts: anything square with ``@`` on ``(P,)`` and ``(P, k)``.

``as_operator`` wraps a curvature operator or a plain symmetric tensor in one
small adapter that

* validates the shape (2-D, square) and exposes ``size``, ``dtype``, ``device``;
* validates the vectors it is given (``_checks.check_vector``), once: the
  finiteness of a *product* is checked here only when the wrapped object does
  not check it itself (a ``CurvatureOperator`` does);
* counts matrix-vector products (a ``(P, k)`` product counts ``k``) and puts the
  product's number into every error a product raises;
* carries the wrapped operator's ``layout`` (a ``ParamLayout``) when it has one,
  so results can be keyed by parameter name without linalg knowing networks;
* has a ``fingerprint()`` of the matrix it stands for, which every checkpointed
  algorithm stores under ``"operator"`` so a checkpoint of another matrix is refused;
* carries the base's ``precision_note`` (a half-precision model's caveat) when it has one;
* takes every inner product and norm of the algorithms (``dot``, ``norm``,
  ``col_norms``, ``allreduce_``) and draws every random vector (``draw``).

Sharded vectors (the protocol). A base may set ``sharded = True`` and give
``global_size`` (P over all ranks), ``local_range = (lo, hi)`` (this rank's
entries ``[lo, hi)`` of the full flat vector; its ``shape`` is then
``(hi - lo, hi - lo)``: it maps the local slice of a global vector ``v`` to the
local slice of ``A v``) and ``allreduce_(t)`` (in-place sum of a small tensor
over the ranks, returning ``t``). The adapter then sums every inner product
over the ranks, and ``draw`` gives each rank its slice of ONE global random
vector, so every estimator returns the same numbers on every rank, equal to a
single-process run on the whole matrix, while each rank stores only its slice
of the Krylov vectors: (k x P) / world entries per rank. An unsharded base
behaves as one rank holding everything (``local_range = (0, P)``).

Non-convergence convention of ``nethessian.linalg``: a result that carries a
``converged`` flag (``EigenResult``, ``SolveResult``) is returned and a
``NotConvergedWarning`` is issued; a function that returns a bare tensor
(``inverse_hvp``) raises ``NotConvergedError`` with the full result attached.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .. import distributed
from .._fingerprint import Hasher
from .._checks import all_finite, as_seed, check_vector
from ._accumulate import column_sums, gram
from ..errors import InputError, NonFiniteError, NotConvergedWarning, NotSymmetricError

__all__ = [
    "NotConvergedWarning",
    "Operator",
    "as_operator",
    "check_symmetric",
    "make_generator",
    "product_error",
    "symmetry_rtol",
]


def fingerprint_of(base: Any) -> str:
    """sha256 hex of what ``base``'s products depend on.

    A base with a ``fingerprint()`` (a ``CurvatureOperator``) gives its own; a
    tensor is hashed by bytes, shape and dtype; any other object by its class
    name, shape, dtype and the tensors among its attributes.
    """
    own = getattr(base, "fingerprint", None)
    if callable(own) and not isinstance(base, torch.Tensor):
        return str(own())
    if isinstance(base, torch.Tensor):
        return Hasher().tensor(base).hexdigest()
    h = Hasher().text(f"{type(base).__qualname__}|{tuple(base.shape)}|{base.dtype}")
    tensors = (
        sorted((n, v) for n, v in vars(base).items() if isinstance(v, torch.Tensor))
        if hasattr(base, "__dict__")
        else []
    )
    return h.named(tensors).hexdigest()


class Operator:
    """Counting, checking adapter around a square linear operator."""

    def __init__(self, base: Any):
        if isinstance(base, Operator):
            base = base.base
        shape = tuple(getattr(base, "shape", ()))
        if len(shape) != 2:
            raise InputError(f"expected a square matrix or operator of shape (P, P), got shape {shape}")
        if shape[0] != shape[1]:
            raise InputError(f"the operator must be square, got shape {shape}")
        if isinstance(base, torch.Tensor):
            check_vector(base, shape[0], "the matrix")  # dense, real, floating point, finite
        self.base = base
        self.size = int(shape[0])
        self.shape = (self.size, self.size)
        self.dtype = base.dtype
        self.device = torch.device(base.device)
        layout = getattr(base, "layout", None)  # torch.Tensor.layout is torch.strided: not ours
        self.layout = None if isinstance(base, torch.Tensor) or isinstance(layout, torch.layout) else layout
        # a CurvatureOperator checks its own products (and names the batch); don't repeat it
        self._checks_itself = hasattr(base, "objective")
        self.num_matvecs = 0
        self._fingerprint: Optional[str] = None
        self.precision_note: Optional[str] = (
            None if isinstance(base, torch.Tensor) else getattr(base, "precision_note", None)
        )
        self._sharding(base)

    def _sharding(self, base: Any) -> None:
        """Read the sharded-vector protocol (see the module docstring) and check it."""
        self.sharded = bool(getattr(base, "sharded", False)) and not isinstance(base, torch.Tensor)
        if not self.sharded:
            self.global_size, self.local_range = self.size, (0, self.size)
            return
        P, (lo, hi) = int(base.global_size), tuple(int(x) for x in base.local_range)
        if not 0 <= lo <= hi <= P or hi - lo != self.size:
            raise InputError(
                f"a sharded operator's local_range {(lo, hi)} must lie in [0, global_size={P}] "
                f"and span its local shape {self.shape}"
            )
        if not callable(getattr(base, "allreduce_", None)):
            raise InputError("a sharded operator needs allreduce_(t): the in-place sum over the ranks")
        self.global_size, self.local_range = P, (lo, hi)

    # ---------------------------------------------------------------- reductions

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place (sharded base), else return it unchanged."""
        return self.base.allreduce_(t) if self.sharded else t

    def dot(
        self, X: torch.Tensor, Y: torch.Tensor, *, dtype: Optional[torch.dtype] = None, reduce: bool = True
    ) -> torch.Tensor:
        """``Xᵀ Y`` over the whole (global) vectors: the local part summed over the ranks.

        ``X``, ``Y`` are (n,) or (n, k) local slices; the product is taken in their
        promoted dtype, or in ``dtype`` (e.g. float64 for a few columns). 1-D with
        1-D gives a 0-dim tensor. ``reduce=False`` returns the local part only (to
        sum several parts with one ``allreduce_``).
        """
        if dtype == torch.float64 and (X.dtype, Y.dtype) != (dtype, dtype):  # no float64 copies
            out = gram(X.reshape(X.shape[0], -1), Y.reshape(Y.shape[0], -1))
            out = out.reshape(X.shape[1:] + Y.shape[1:]).to(X.device if X.device.type != "mps" else "cpu")
            return self.allreduce_(out.contiguous()) if reduce else out
        if dtype is not None:
            X, Y = X.to(dtype), Y.to(dtype)
        elif X.dtype != Y.dtype:
            common = torch.promote_types(X.dtype, Y.dtype)
            X, Y = X.to(common), Y.to(common)
        out = torch.dot(X, Y) if X.ndim == 1 and Y.ndim == 1 else X.T @ Y if X.ndim == 2 else X @ Y
        return self.allreduce_(out.contiguous()) if reduce else out

    def col_norms(self, X: torch.Tensor) -> torch.Tensor:
        """Euclidean norms of the (global) columns of ``X`` (n, k), float64 (k,) on the CPU.

        Accumulated in float64 a piece at a time (``_accumulate``): no float64 copy of ``X``.
        """
        sq = column_sums(X, X)
        if sq.device.type == "mps":
            sq = sq.cpu()
        return self.allreduce_(sq).sqrt().cpu()

    def norm(self, x: torch.Tensor) -> float:
        """Euclidean norm of the (global) vector whose local slice is ``x``, in float64."""
        return float(self.col_norms(x.reshape(-1, 1))[0])

    # ---------------------------------------------------------------- random vectors

    def draw(
        self, kind: str, k: Optional[int], generator: torch.Generator, dtype: Optional[torch.dtype] = None
    ) -> torch.Tensor:
        """This rank's slice of ``k`` global random columns (``k=None``: one (n,) vector).

        ``kind`` is ``"normal"`` or ``"rademacher"``. See ``draw_columns``: the
        numbers do not depend on the number of ranks.
        """
        cols = 1 if k is None else k
        X = draw_columns(kind, self.global_size, self.local_range, cols, generator, dtype or self.dtype).to(self.device)
        return X[:, 0] if k is None else X

    def fingerprint(self) -> str:
        """sha256 hex of the matrix (see ``fingerprint_of``), computed once."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self.base)
        return self._fingerprint

    def key(self, checkpoint: Any) -> str:
        """``fingerprint()`` for a checkpoint's identity; ``""`` without one (a model's takes a pass over the data)."""
        return "" if checkpoint is None else self.fingerprint()

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        step = self.num_matvecs + 1
        if not self._checks_itself:  # a CurvatureOperator validates its input itself
            check_vector(v, self.size, f"the vector of product {step}")
        v = v.to(device=self.device, dtype=self.dtype)
        k = 1 if v.ndim == 1 else v.shape[1]
        try:
            out = self.base @ v
        except NonFiniteError as exc:
            raise NonFiniteError(f"at matrix-vector product {step}: {exc}") from None
        self.num_matvecs += k
        if not self._checks_itself and not all_finite(out):
            raise NonFiniteError(
                f"matrix-vector product {step} returned NaN or Inf; the operator (model, loss "
                "or data) is not finite at this point"
            )
        return out

    matmul = __matmul__


def as_operator(A: Any) -> Operator:
    """Wrap ``A`` (operator or tensor) for use by an estimator, with a fresh product count."""
    return Operator(A)


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator seeded with ``distributed.common_seed(seed)``.

    Random vectors are drawn on the CPU so every device sees the same ones, and
    the seed is the same on every rank (``seed=None`` is drawn on rank 0 and
    broadcast), so all ranks run the same iterations on the same numbers.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(distributed.common_seed(as_seed(seed))))
    return g


_PIECE = 1 << 18  # entries per independently seeded piece of a random column
_MASK = (1 << 63) - 1


def _piece_seed(base: int, piece: int) -> int:
    """A 63-bit seed for one piece of a column (splitmix64 mixing of the two numbers)."""
    z = (base + 0x9E3779B97F4A7C15 * (piece + 1)) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


def draw_columns(
    kind: str, P: int, local_range, k: int, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Rows ``[lo, hi)`` of a global (P, k) random block on the CPU, drawn in float64, stored in ``dtype``.

    For each column one number is drawn from ``generator`` (the common, seeded
    one: every rank draws it alike), and the column is cut into pieces of ``2**18``
    entries, piece ``i`` drawn from its own generator seeded by (that number, i);
    so k columns drawn at once equal k columns drawn one by one. A rank
    draws only the pieces that meet its range, so the work and the transient
    memory are O(local size + 2**18) per column — not O(P) — and the numbers are
    exactly those of a single-process draw whatever the number of ranks.
    """
    lo, hi = local_range
    out = torch.empty(hi - lo, k, dtype=dtype if dtype.is_floating_point else torch.float64)
    g = torch.Generator(device="cpu")
    for j in range(k):
        base = int(torch.randint(0, 1 << 62, (), generator=generator))
        for i in range(lo // _PIECE, -(-hi // _PIECE)):
            a, b = i * _PIECE, min(P, (i + 1) * _PIECE)
            g.manual_seed(_piece_seed(base, i))
            if kind == "normal":
                piece = torch.randn(b - a, generator=g, dtype=torch.float64)
            elif kind == "rademacher":
                piece = torch.randint(0, 2, (b - a,), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
            else:
                raise ValueError(f"unknown random kind {kind!r}")
            s, e = max(a, lo), min(b, hi)
            out[s - lo : e - lo, j] = piece[s - a : e - a]
    return out


def randn(op: Operator, n: int, k: Optional[int] = None, *, generator: torch.Generator, dtype=None) -> torch.Tensor:
    """Standard normal columns (``op.draw``); ``n`` must be the operator's (local) size."""
    assert n == op.size
    return op.draw("normal", k, generator, dtype)


def rademacher(
    op: Operator, n: int, k: Optional[int] = None, *, generator: torch.Generator, dtype=None
) -> torch.Tensor:
    """Random signs ±1 (``op.draw``); ``n`` must be the operator's (local) size."""
    assert n == op.size
    return op.draw("rademacher", k, generator, dtype)


def symmetry_rtol(op: Operator) -> float:
    """Relative asymmetry tolerated from rounding alone: 1e-8 in float64, 1e-3 otherwise."""
    return 1e-8 if op.dtype == torch.float64 else 1e-3


def product_error(op: Operator) -> Tuple[float, str]:
    """``(allowance, hint)`` for an operator whose products carry an error estimate.

    Finite-difference products ``H̃ v`` are symmetric only up to their error ``E``
    (``‖E v̂‖ ≤ op.fd_error`` per unit ``v̂``), so for unit ``u, v`` the test quantity
    ``uᵀH̃v − vᵀH̃u`` may reach ``2·fd_error``; the allowance is twice that (estimates
    are estimates). Exact operators: ``(0.0, "")``.
    """
    err = getattr(op.base, "fd_error", None)
    if not isinstance(err, float):
        return 0.0, ""
    return 4.0 * err, (
        f". The operator's finite-difference products carry an estimated error of {err:.2g} per "
        "unit ‖v‖ (op.fd_error), allowed for here: an asymmetry beyond it means the step is wrong "
        "for this model. Leave fd_step=None, or try fd_order=4"
    )


def check_symmetric(op: Operator, generator: torch.Generator, *, rtol: Optional[float] = None) -> float:
    """Cheap symmetry test with 2 products: compare uᵀ(Av) with vᵀ(Au).

    Returns the relative asymmetry; raises ``NotSymmetricError`` above ``rtol``
    (default ``symmetry_rtol``: 1e-3 in float32, 1e-8 in float64) plus, for
    finite-difference products, their estimated error (``product_error``).
    """
    if rtol is None:
        rtol = symmetry_rtol(op)
    UV = randn(op, op.size, 2, generator=generator)
    A_UV = op @ UV
    G = op.dot(UV, A_UV, dtype=torch.float64).cpu()  # G[i, j] = UV_iᵀ A UV_j
    a, b = G[0, 1], G[1, 0]
    n, An = op.col_norms(UV), op.col_norms(A_UV)
    scale = max(float(n[0] * An[1]), float(n[1] * An[0]), torch.finfo(torch.float64).tiny)
    rel = float((a - b).abs()) / scale
    allowance, hint = product_error(op)  # read after the products: they set the estimate
    if float((a - b).abs()) > rtol * scale + allowance * float(n[0] * n[1]):
        raise NotSymmetricError(
            f"the operator is not symmetric: u·(A v) = {float(a):.6g} but v·(A u) = {float(b):.6g} "
            f"(relative difference {rel:.2e} > {rtol:.0e}); Lanczos and CG need a symmetric operator"
            + hint
            + _distributed_hint()
        )
    return rel


def _distributed_hint() -> str:
    if not distributed.is_active():
        return ""
    return (
        f". Under torch.distributed ({distributed.world_size()} ranks) an asymmetry also appears when "
        "the ranks multiply different vectors: a seed=None that was not drawn once and broadcast "
        "(nh.distributed.common_seed), or ranks holding different weights or data"
    )
