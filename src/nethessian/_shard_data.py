"""One rank's part of a data set: contiguous slices of a pair, every world-th batch otherwise.

``distributed.shard`` resolves this process's rank and the world size and calls
``shard_batches``; the slicing itself lives here.
"""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["shard_batches"]


class _Sharded:
    """Every ``world``-th batch of a re-iterable, starting at ``rank``."""

    def __init__(self, data, rank: int, world: int):
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self):
        for i, b in enumerate(self.data):
            if i % self.world == self.rank:
                yield b


def shard_batches(data, r: int, w: int):
    """Rank ``r`` of ``w``'s part of ``data`` (see ``nethessian.distributed.shard``)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        n = data[1].shape[0]
        if n < w:
            raise InputError(f"{n} samples cannot be shared by {w} ranks: every rank needs one")
        lo, hi = r * n // w, (r + 1) * n // w
        return (_slice(data[0], lo, hi), data[1][lo:hi])
    if isinstance(data, (tuple, list)):
        if len(data) < w:
            raise InputError(f"{len(data)} batches cannot be shared by {w} ranks: every rank needs one")
        return list(data[r::w])
    return _Sharded(data, r, w)


def _slice(x, lo, hi):
    if isinstance(x, torch.Tensor):
        return x[lo:hi]
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(t, lo, hi) for t in x)
    if isinstance(x, dict):
        return {k: _slice(v, lo, hi) for k, v in x.items()}
    raise InputError(f"cannot shard inputs of type {type(x).__name__}")
