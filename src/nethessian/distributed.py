"""Data-parallel reduction through torch.distributed (a no-op in a single process)."""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["is_active", "reduce_sum", "rank", "world_size"]


def is_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_active() else 1


def reduce_sum(total: torch.Tensor, count: float) -> Tuple[torch.Tensor, float]:
    """All-reduce a local sum and its term count (identity without torch.distributed)."""
    if not is_active():
        return total, count
    flat = torch.cat([total.reshape(-1).double(), torch.tensor([count], dtype=torch.float64, device=total.device)])
    torch.distributed.all_reduce(flat)
    return flat[:-1].reshape(total.shape).to(total.dtype), float(flat[-1])
