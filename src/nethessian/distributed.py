"""Data parallelism through torch.distributed (gloo on CPU, NCCL on GPU).

When a process group is initialised, every process holds a shard of the data;
``Objective.finish`` all-reduces each local weighted sum together with its term
count, so batch weights use the *global* count and every rank gets the same
product. Nothing else in nethessian knows about processes: estimators draw
their random vectors from seeded CPU generators, so all ranks run the same
Krylov iterations on the same numbers.

Cost: one all-reduce of P (+1) numbers per matrix-vector product (k·P for a
block of k vectors).
"""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Optional, Sequence, Tuple

import torch

from .errors import DistributedError, InputError, NetHessianError

__all__ = ["DistributedError", "is_active", "rank", "world_size", "is_main", "reduce_sum",
           "check_consistent", "shard", "init_from_env"]


def is_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes files."""
    return rank() == 0


def _collective(fn, what: str):
    try:
        return fn()
    except Exception as exc:  # gloo / NCCL raise RuntimeError or DistBackendError
        raise DistributedError(
            f"rank {rank()}: {what} across {world_size()} processes failed — another rank died, "
            f"hung past the process group's timeout, or left early ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Set the timeout with "
            "init_process_group(timeout=datetime.timedelta(seconds=...))"
        ) from None


def reduce_sum(total: torch.Tensor, count: float) -> Tuple[torch.Tensor, float]:
    """All-reduce a local sum and its term count (identity without torch.distributed)."""
    if not is_active():
        return total, count
    if total is None:
        raise InputError(f"rank {rank()} has no batches: every rank needs at least one (see nh.shard)")
    flat = torch.cat([total.detach().reshape(-1).to(torch.float64),
                      torch.tensor([count], dtype=torch.float64, device=total.device)])
    _collective(lambda: torch.distributed.all_reduce(flat), "all-reduce of a curvature product")
    return flat[:-1].reshape(total.shape).to(total.dtype), float(flat[-1])


def check_consistent(names: Sequence[str], shapes: Sequence[Sequence[int]], dtype: torch.dtype,
                     device: torch.device) -> None:
    """Refuse, on every rank, models whose parameters differ across ranks (names, shapes, dtype)."""
    if not is_active():
        return
    desc = repr((list(names), [list(s) for s in shapes], str(dtype))).encode()
    digest = int.from_bytes(hashlib.sha256(desc).digest()[:7], "big")
    size = sum(int(torch.tensor(s).prod()) if len(s) else 1 for s in shapes)
    mine = torch.tensor([digest, size], dtype=torch.int64,
                        device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    everyone = [torch.zeros_like(mine) for _ in range(world_size())]
    _collective(lambda: torch.distributed.all_gather(everyone, mine), "the start-up model check")
    if any(not torch.equal(e, everyone[0]) for e in everyone):
        sizes = [int(e[1]) for e in everyone]
        raise DistributedError(
            f"the model differs across ranks (parameter counts per rank: {sizes}); every rank must "
            "build the same model with the same params= selection"
        )


def check_theta(theta: torch.Tensor) -> None:
    """Refuse parameter values that differ across ranks (different seeds or checkpoints)."""
    if not is_active():
        return
    ref = theta.detach().clone()
    _collective(lambda: torch.distributed.broadcast(ref, src=0), "the start-up weight check")
    if not torch.equal(ref, theta.detach()):
        raise DistributedError(
            f"rank {rank()}'s parameter values differ from rank 0's: seed the model identically or "
            "load the same weights on every rank"
        )


class _Sharded:
    """Every ``world_size``-th batch of a re-iterable, starting at ``rank``."""

    def __init__(self, data, rank: int, world: int):
        self.data, self.rank, self.world = data, rank, world

    def __iter__(self):
        for i, b in enumerate(self.data):
            if i % self.world == self.rank:
                yield b


def shard(data, rank_: Optional[int] = None, world: Optional[int] = None):
    """This rank's part of ``data``, so that the parts over all ranks are the whole data set.

    * an ``(inputs, targets)`` pair: contiguous slices along the first dimension
      (sizes differ by at most one);
    * a list/tuple of batches: every ``world``-th batch;
    * any other re-iterable (a ``DataLoader``): a view yielding every ``world``-th batch.

    Don't use ``DistributedSampler`` for curvature: it pads shards with repeated
    samples so that they have equal sizes, which changes the cost.
    """
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if not 0 <= r < w:
        raise InputError(f"rank {r} is not in [0, {w})")
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


def init_from_env(timeout_s: float = 300.0, backend: Optional[str] = None) -> bool:
    """Initialise the default process group from torchrun's environment, if launched that way."""
    if is_active() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return is_active()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True
