"""CurvatureOperator: the base every curvature matrix (Hessian, GGN, Fisher) shares.

A concrete operator implements ``_matmat(V)`` for a ``(P, k)`` block of
vectors. The base does everything else once: input checks, ``@`` on ``(P,)``
and ``(P, k)`` (in memory-bounded chunks), ``to_dense`` (with a memory check,
progress bar and checkpoints) and ``to_scipy``.
"""
from __future__ import annotations

from typing import Optional

import torch
from tqdm import tqdm

from .._checks import all_finite
from ..errors import DenseTooLargeError, InputError, NonFiniteError
from .._objective import Objective

__all__ = ["CurvatureOperator", "DEFAULT_MAX_DENSE_BYTES", "check_dense_size"]

DEFAULT_MAX_DENSE_BYTES = 4 * 2**30


def check_dense_size(P: int, dtype: torch.dtype, max_bytes: Optional[int]) -> int:
    """Refuse a dense ``P × P`` matrix above ``max_bytes`` (default 4 GiB); return its size in bytes."""
    limit = DEFAULT_MAX_DENSE_BYTES if max_bytes is None else int(max_bytes)
    need = P * P * torch.empty((), dtype=dtype).element_size()
    if need > limit:
        raise DenseTooLargeError(
            f"the dense {P} x {P} {str(dtype).replace('torch.', '')} matrix needs {need:,} bytes "
            f"({need / 2**30:.1f} GiB), above the limit of {limit:,} bytes. Pass max_bytes={need} to "
            "allow it, or stay matrix-free: HessianOperator(...) with nh.eigenvalues, nh.trace, "
            "nh.diagonal or nh.spectral_density"
        )
    return need


class CurvatureOperator:
    """Symmetric ``P × P`` curvature matrix of J(θ) at the parameters' current values.

    The operator snapshots θ at construction; later changes to the model's
    weights do not affect it. ``op @ v`` takes ``(P,)`` or ``(P, k)`` tensors.
    """

    def __init__(self, model, loss_fn, data, params=None, *, reduction=None,
                 allow_random: bool = False, chunk_size: Optional[int] = None):
        self.objective = Objective(model, loss_fn, data, params, reduction=reduction,
                                   allow_random=allow_random)
        self.layout = self.objective.layout
        P = self.layout.size
        self.shape = (P, P)
        self.dtype = self.objective.dtype
        self.device = self.objective.device
        if chunk_size is None:
            # bounded memory: a chunk of columns holds at most ~64 Mi entries of vectors
            chunk_size = max(1, min(256, (64 * 2**20) // max(P, 1)))
        if int(chunk_size) < 1:
            raise InputError(f"chunk_size must be a positive integer, got {chunk_size}")
        self.chunk_size = int(chunk_size)

    @property
    def names(self):
        return self.layout.names

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(v).__name__}")
        P = self.shape[0]
        if v.ndim not in (1, 2) or v.shape[0] != P:
            raise InputError(f"expected a tensor of shape ({P},) or ({P}, k), got {tuple(v.shape)}")
        if not all_finite(v):
            raise NonFiniteError("the vector contains NaN or Inf")
        v = v.to(device=self.device, dtype=self.dtype)
        if v.ndim == 1:
            out = self._matvec(v)
        elif v.shape[1] == 0:
            return v.clone()
        elif v.shape[1] <= self.chunk_size:
            out = self._matmat(v)
        else:
            out = torch.cat([self._matmat(v[:, i:i + self.chunk_size])
                             for i in range(0, v.shape[1], self.chunk_size)], dim=1)
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
                g, = torch.autograd.grad(loss, theta, allow_unused=True)
            if not torch.isfinite(loss) or (g is not None and not torch.isfinite(g).all()):
                what = "loss" if not torch.isfinite(loss) else "gradient"
                return (f"the product is NaN or Inf: batch {batch.index} has a non-finite {what} "
                        f"(loss = {float(loss.detach())}); check that batch's data and the loss (log of 0, overflow)")
        return ("the product is NaN or Inf although every batch's loss and gradient are finite: the "
                f"second derivative overflows in {str(self.dtype).replace('torch.', '')}; try float64")

    matmul = __matmul__

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._matmat(v[:, None])[:, 0]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dense(self, *, max_bytes: Optional[int] = None, progress: bool = False,
                 checkpoint=None) -> torch.Tensor:
        """The dense matrix, column chunk by column chunk (memory checked first).

        ``checkpoint`` (a ``nethessian._checkpoint.Checkpoint``) saves finished
        column chunks so an interrupted run resumes where it stopped.
        """
        P = self.shape[0]
        check_dense_size(P, self.dtype, max_bytes)
        out = torch.empty(P, P, dtype=self.dtype, device=self.device)
        done = 0
        if checkpoint is not None:
            state = checkpoint.load()
            if state is not None:
                done = int(state["done"])
                out[:, :done] = state["columns"].to(out)
        c = self.chunk_size
        with tqdm(total=P, initial=done, disable=not progress, desc="dense columns", unit="col",
                  leave=False) as bar:
            for start in range(done, P, c):
                stop = min(P, start + c)
                E = torch.zeros(P, stop - start, dtype=self.dtype, device=self.device)
                E[torch.arange(start, stop), torch.arange(stop - start)] = 1
                out[:, start:stop] = self._matmat(E)
                bar.update(stop - start)
                if checkpoint is not None and (stop == P or checkpoint.due()):
                    checkpoint.save({"done": stop, "columns": out[:, :stop].cpu()}, force=True)
        return out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for SciPy solvers."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            t = torch.from_numpy(np.ascontiguousarray(x)).to(device=self.device, dtype=self.dtype)
            return (self @ t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mv, rmatvec=mv, rmatmat=mv, dtype=np.float64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(P={self.shape[0]}, params={len(self.layout.names)}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, device={self.device})")
