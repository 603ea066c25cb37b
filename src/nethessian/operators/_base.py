"""CurvatureOperator: the base every curvature matrix (Hessian, GGN, Fisher) shares.

A concrete operator offers its engines (``_engines()``, see ``_engine.py``) and the
options that define its matrix (``_matrix_options()``). The base does everything
else, once: input checks (``_checks.check_vector``), the engine choice, ``@`` on
``(P,)`` and ``(P, k)`` in chunks (``_columns.column_chunk`` with the engine's memory per
column), one finiteness check of every result, ``to_dense`` through
``_columns.identity_columns`` (checkpoints carry the operator's fingerprint),
``to_scipy``, ``fingerprint()`` and ``at(theta)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Dict, List, Optional

import torch

from .._checks import all_finite, as_int, check_vector
from .._columns import column_chunk, identity_columns
from .. import distributed as dist
from .._objective import Objective
from ..errors import DenseTooLargeError, InputError, NonFiniteError
from ._engine import Engine, choose_batched, choose_engine, loop_columns

__all__ = ["CurvatureOperator", "DEFAULT_MAX_DENSE_BYTES", "check_dense_size"]

DEFAULT_MAX_DENSE_BYTES = 4 * 2**30


def _gib(n: float) -> str:
    return f"{n:,.0f} bytes ({n / 2**30:.2f} GiB)"


def check_dense_size(P: int, dtype: torch.dtype, max_bytes: Optional[int], work_bytes: float = 0) -> int:
    """Refuse a dense ``P × P`` matrix whose memory exceeds ``max_bytes`` (default 4 GiB).

    The estimate is the matrix, ``P² × itemsize``, plus ``work_bytes``: what one chunk
    of products holds while it runs (its vectors and, for a batched engine, every
    column's activations). Returns the estimate in bytes.
    """
    limit = DEFAULT_MAX_DENSE_BYTES if max_bytes is None else as_int("max_bytes", max_bytes, minimum=0)
    matrix = P * P * torch.empty((), dtype=dtype).element_size()
    need = int(matrix + work_bytes)
    if need > limit:
        raise DenseTooLargeError(
            f"the dense {P} x {P} {str(dtype).replace('torch.', '')} matrix needs {_gib(need)}: "
            f"{_gib(matrix)} for the matrix and {_gib(work_bytes)} for one chunk of products, above "
            f"the limit of {limit:,} bytes. Pass max_bytes={need} to allow it (or a smaller "
            "chunk_size), or stay matrix-free: HessianOperator(...) with nh.eigenvalues, nh.trace, "
            "nh.diagonal or nh.spectral_density"
        )
    return need


class CurvatureOperator:
    """Symmetric ``P × P`` curvature matrix of J(θ) at the parameters' current values.

    The operator snapshots θ at construction; later changes to the model's weights do
    not affect it (``at(theta)`` gives the same operator at other parameters).
    ``op @ v`` takes ``(P,)`` or ``(P, k)`` tensors.

    Attributes:
        engine: the engine that computes products, chosen once at construction.
        engine_reason: why that engine (and, after a fallback, why not the others).
        fallback_reason: why the preferred engine was not used, or None.
        batched: columns vectorised (vmap) or looped; None until the first block product.
        chunk_size: columns per product.
    """

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        reduction=None,
        allow_random: bool = False,
        dtype=None,
        chunk_size: Optional[int] = None,
        _objective=None,
    ):
        self.objective = (
            _objective
            if _objective is not None
            else Objective(model, loss_fn, data, params, reduction=reduction, allow_random=allow_random, dtype=dtype)
        )
        self.layout = self.objective.layout
        P = self.layout.size
        self.shape = (P, P)
        self.dtype = self.objective.dtype
        self.device = self.objective.device
        self._chunk_size = None if chunk_size is None else as_int("chunk_size", chunk_size, minimum=1)
        self._fresh_state()

    # -- hooks for concrete operators ---------------------------------------------------------
    def _engines(self) -> List[Engine]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matrix_options(self) -> Dict[str, Any]:
        """The options that change the matrix (not merely how it is computed)."""
        return {}

    def _fresh_state(self) -> None:
        """Drop what depends on θ (kept graphs); engine decisions stay."""

    def _bytes_per_column(self) -> Optional[float]:
        """Memory one vectorised column holds while a product runs (None: unknown)."""
        return None

    # -- the engine ---------------------------------------------------------------------------
    def _choose_engine(self) -> None:
        engines = self._engines()
        self._engine, self.engine_reason, self.fallback_reason = choose_engine(engines)
        self.batched: Optional[bool] = None
        self.batched_reason: Optional[str] = None
        self._bpc: Optional[float] = None

    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def cache(self) -> bool:
        """True when products go through a graph kept across products."""
        return self._engine.keeps_graph

    @property
    def bytes_per_column(self) -> float:
        """Estimated memory per vectorised column, measured once (0 when not batched)."""
        if self._bpc is None:
            # every rank must cut products into the same chunks (the all-reduce sizes)
            self._bpc = float(dist.common_value(float(self._bytes_per_column() or 0.0), how="max"))
        return self._bpc

    @property
    def chunk_size(self) -> int:
        """Columns per product: yours, or ``column_chunk`` with the engine's memory per column."""
        if self._chunk_size is not None:
            return self._chunk_size
        bpc = self.bytes_per_column if self.batched is not False else None
        return column_chunk(self.shape[0], bytes_per_column=bpc)

    @classmethod
    def from_objective(cls, objective: Objective, **options) -> "CurvatureOperator":
        """This kind of operator on an existing ``Objective`` (no new snapshot, no re-validation).

        One problem, one objective: e.g. the GGN next to the Hessian of the same model,
        data and parameters. ``options`` are the class's own (``method=``, ``cache=``, ...).

        >>> import nethessian as nh
        >>> H = nh.HessianOperator(*nh.examples.two_layer())
        >>> nh.GGNOperator.from_objective(H.objective).objective is H.objective
        True
        """
        if not isinstance(objective, Objective):
            raise InputError(f"from_objective needs a nethessian Objective, got {type(objective).__name__}")
        return cls(objective.model, objective.loss_fn, None, _objective=objective, **options)

    @property
    def names(self):
        """The parameter names, in the flat vector's order."""
        return self.layout.names

    @property
    def precision_note(self) -> Optional[str]:
        """What half-precision arithmetic does to the products (``None`` in float32/float64).

        Estimators copy it into their results, so a number computed in bf16/fp16 says so.
        """
        return getattr(self.objective, "precision_note", None)

    # -- products -----------------------------------------------------------------------------
    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        check_vector(v, self.shape[0], "the vector")
        v = v.to(device=self.device, dtype=self.dtype)
        if v.ndim == 1:
            return self._product(v[:, None])[:, 0]
        return self._product(v)

    matmul = __matmul__

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        """``C V`` for a checked ``(P, k)`` block: chunked, one engine, one finiteness check."""
        k = V.shape[1]
        if k == 0:
            return V.clone()
        if k > 1 and self.batched is None:
            self.batched, self.batched_reason = choose_batched(self._engine, V)
        run = self._engine.run if k == 1 or self.batched else (lambda W: loop_columns(self._engine.run, W))
        c = self.chunk_size
        out = run(V) if k <= c else torch.cat([run(V[:, i : i + c]) for i in range(0, k, c)], dim=1)
        if not all_finite(out):
            raise NonFiniteError(self._nonfinite_culprit())
        return out

    def _nonfinite_culprit(self) -> str:
        """Name the batch whose loss or gradient is not finite (run only after a bad product)."""
        obj = self.objective
        theta, named = obj.leaf()
        for batch in obj.data:
            with torch.enable_grad():
                loss, _ = obj.batch_loss(named, batch)
                (g,) = torch.autograd.grad(loss, theta, allow_unused=True)
            if not torch.isfinite(loss) or (g is not None and not torch.isfinite(g).all()):
                what = "loss" if not torch.isfinite(loss) else "gradient"
                return (
                    f"the product is NaN or Inf: batch {batch.index} has a non-finite {what} "
                    f"(loss = {float(loss.detach())}); check that batch's data and the loss (log of 0, overflow)"
                )
        return (
            "the product is NaN or Inf although every batch's loss and gradient are finite: the "
            f"second derivative overflows in {str(self.dtype).replace('torch.', '')}; try float64"
        )

    # -- exports ------------------------------------------------------------------------------
    def to_dense(
        self, *, max_bytes: Optional[int] = None, progress: Optional[bool] = None, checkpoint=None
    ) -> torch.Tensor:
        """The dense matrix, column chunk by column chunk (memory checked first).

        The memory check counts the matrix and one chunk of products. ``checkpoint`` (a
        ``nethessian._checkpoint.Checkpoint``) saves finished column chunks so an
        interrupted run resumes where it stopped; it refuses columns of another operator
        (other weights, data, options).
        """
        P = self.shape[0]
        check_dense_size(P, self.dtype, max_bytes)  # before measuring anything
        c = self.chunk_size
        work = c * (P * self.dtype.itemsize * 2 + self.bytes_per_column)
        check_dense_size(P, self.dtype, max_bytes, work)
        identity = {"operator": self.fingerprint()} if checkpoint is not None else None
        return identity_columns(
            self._product,
            P,
            dtype=self.dtype,
            device=self.device,
            chunk=c,
            checkpoint=checkpoint,
            identity=identity,
            progress=progress,
        )

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for SciPy solvers."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            t = torch.from_numpy(np.ascontiguousarray(x)).to(device=self.device, dtype=self.dtype)
            return (self @ t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mv, rmatvec=mv, rmatmat=mv, dtype=np.float64)

    # -- identity and other parameters --------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 hex of what the matrix depends on: the class, its matrix options, the objective."""
        opts = json.dumps(self._matrix_options(), sort_keys=True, default=str)
        text = f"{type(self).__name__}\n{opts}\n{self.objective.fingerprint()}"
        return hashlib.sha256(text.encode()).hexdigest()

    def at(self, theta: torch.Tensor) -> "CurvatureOperator":
        """The same operator (class, options, engine) at parameters ``theta``; no re-validation.

        Args:
            theta: flat ``(P,)`` parameter values, in ``op.names`` order.
        """
        check_vector(theta, self.shape[0], "theta")
        if theta.ndim != 1:
            raise InputError(f"theta must be a flat ({self.shape[0]},) tensor, got {tuple(theta.shape)}")
        new = copy.copy(self)
        new.objective = self.objective.at(theta.detach().to(device=self.device, dtype=self.dtype))
        new._fresh_state()
        new._engine = next(e for e in new._engines() if e.name == self.engine)  # no new trial
        return new

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.shape[0]}, params={len(self.layout.names)}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, device={self.device}, "
            f"engine={self.engine!r})"
        )
