"""One rank's part of a data set: contiguous slices of a pair or of one dict batch, every world-th batch otherwise.

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


def _bounds(n: int, r: int, w: int):
    if n < w:
        raise InputError(f"{n} samples cannot be shared by {w} ranks: every rank needs one")
    return r * n // w, (r + 1) * n // w


def _dict_batch(data: dict, r: int, w: int) -> dict:
    """One Hugging Face-style batch (``input_ids``, ``attention_mask``, ``labels``): its rows sliced."""
    sizes = {k: v.shape[0] for k, v in data.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes or len(set(sizes.values())) != 1:
        raise InputError(
            f"cannot shard a dict batch whose tensors do not share a first (batch) dimension: {sizes}; "
            "pass a list of batches (each rank takes every world-th) or tensors of equal batch size"
        )
    lo, hi = _bounds(next(iter(sizes.values())), r, w)
    return {k: (v[lo:hi] if k in sizes else v) for k, v in data.items()}


def shard_batches(data, r: int, w: int):
    """Rank ``r`` of ``w``'s part of ``data`` (see ``nethessian.distributed.shard``)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        lo, hi = _bounds(data[1].shape[0], r, w)
        return (_slice(data[0], lo, hi), data[1][lo:hi])
    if isinstance(data, dict):
        return _dict_batch(data, r, w)
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
