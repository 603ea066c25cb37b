"""Resumable blocks of products for the stochastic estimators (Hutchinson, Hutch++, XTrace).

An estimator asks for ``reduce(V, A V)`` over ``n`` columns of a block ``V``
that it can redraw (``draw(start, stop)``, deterministic given the seed). The
columns are multiplied ``chunk`` at a time; what is kept of each chunk (the
product itself, or its reduction to per-block sums) is saved to the checkpoint
under the block's label, so a killed run resumes without redoing finished
products and gives the same numbers as an uninterrupted one. The saved state is
checked on load: operator fingerprint, sizes and seed through
``Checkpoint.resume``, then labels, shapes and finiteness (``CheckpointError``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from .._checks import all_finite
from .._progress import Progress
from ..errors import CheckpointError
from ._operator import Operator
from ._util import resume

__all__ = ["Products"]


class Products:
    """Chunked, counted, checkpointed ``reduce(V, A V)`` over labelled blocks of columns.

    Args:
        A: the operator.
        chunk: columns per product.
        checkpoint: a ``Checkpoint`` or ``None``.
        expect: what the numbers depend on (method, operator fingerprint, sizes, seed).
        bar: the ``Progress`` to advance by one per column.
    """

    def __init__(self, A: Operator, chunk: int, checkpoint: Any, expect: Dict[str, Any], bar: Progress):
        self.A, self.chunk, self.checkpoint, self.expect, self.bar = A, chunk, checkpoint, expect, bar
        self.skipped = 0  # columns a resumed run did not multiply again
        self.saved: Dict[str, torch.Tensor] = {}
        self.done: Dict[str, int] = {}  # finished columns of each saved block
        state = resume(checkpoint, expect)
        if state is not None:
            saved, done = state.get("blocks"), state.get("done", {})
            if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
                raise self._damaged("the saved product blocks are malformed")
            if not isinstance(done, dict):
                raise self._damaged("the saved counts of finished columns are malformed")
            self.saved, self.done = dict(saved), dict(done)

    @property
    def num_matvecs(self) -> int:
        """Products behind the result: this run's and those a resumed checkpoint saved."""
        return self.A.num_matvecs + self.skipped

    def _damaged(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.checkpoint.path!r}: {what}; the file is damaged, delete it to start over")

    def _resumed(self, label: str, rows: int, n: int) -> Optional[torch.Tensor]:
        got = self.saved.get(label)
        if got is None:
            return None
        if got.ndim != 2 or got.shape[0] != rows or got.shape[1] > n or not got.is_floating_point():
            raise self._damaged(f"block {label!r} has shape {tuple(got.shape)}, expected ({rows}, <= {n})")
        done = self.done.get(label, got.shape[1])  # a checkpoint without counts saved finished columns only
        if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= got.shape[1]:
            raise self._damaged(f"block {label!r} has {done!r} finished columns of {got.shape[1]}")
        got = got[:, :done]
        if not all_finite(got):
            raise self._damaged(f"block {label!r} contains NaN or Inf")
        return got

    def run(
        self,
        label: str,
        n: int,
        rows: int,
        draw: Callable[[int, int], torch.Tensor],
        reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """``reduce(V, A V)`` for columns ``0..n`` of ``V``, as a ``(rows, n)`` tensor of ``dtype``.

        ``draw(start, stop)`` returns those columns of ``V`` (it is also called for
        columns a checkpoint already holds, so that a generator it draws from advances
        exactly as in an uninterrupted run). The result is allocated once, stored by
        columns, and each chunk's reduction is written into it: a block of products kept
        whole (``rows`` = the operator's size) takes its own size and no more, and a
        checkpoint saves it with the count of finished columns rather than a copy.
        """
        out = torch.zeros(n, rows, dtype=dtype, device=self.A.device).T
        done = 0
        old = self._resumed(label, rows, n)
        if old is not None and old.shape[1]:
            done = old.shape[1]
            draw(0, done)
            out[:, :done] = old
            del old
            self.skipped += done
            self.bar.update(done)
        for start in range(done, n, self.chunk):
            stop = min(n, start + self.chunk)
            V = draw(start, stop)
            out[:, start:stop] = reduce(V, self.A @ V)
            del V
            self.bar.update(stop - start)
            if self.checkpoint is not None and (stop == n or self.checkpoint.due()):
                self.saved[label], self.done[label] = out.cpu(), stop
                self.checkpoint.save({**self.expect, "blocks": self.saved, "done": self.done}, force=True)
        return out
