"""Helpers shared by the estimators: column chunks, progress bars, checkpoint resumption."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

from .._checkpoint import Checkpoint
from ..errors import CheckpointError, InputError
from ._operator import Operator

__all__ = ["apply_chunked", "default_chunk", "progress_bar", "resume_state"]

_CHUNK_ELEMENTS = 2**24  # entries of one (P, chunk) block of probes: 128 MiB in float64


def default_chunk(P: int, k: int) -> int:
    """Columns per product so that a ``(P, chunk)`` block has at most 2**24 entries."""
    return max(1, min(k, _CHUNK_ELEMENTS // max(P, 1)))


def _chunk(P: int, k: int, chunk_size: Optional[int]) -> int:
    if chunk_size is None:
        return default_chunk(P, k)
    if int(chunk_size) < 1:
        raise InputError(f"chunk_size must be a positive number of columns, got {chunk_size}")
    return int(chunk_size)


def apply_chunked(A: Operator, V: torch.Tensor, chunk_size: Optional[int], bar=None) -> torch.Tensor:
    """``A @ V`` for a ``(P, k)`` block, ``chunk_size`` columns per product."""
    chunk = _chunk(A.size, V.shape[1], chunk_size)
    outs = []
    for start in range(0, V.shape[1], chunk):
        outs.append(A @ V[:, start : start + chunk])
        if bar is not None:
            bar.update(outs[-1].shape[1])
    return torch.cat(outs, dim=1) if outs else V.new_zeros(V.shape)


def progress_bar(enabled: bool, total: int, desc: str, initial: int = 0, unit: str = "matvec"):
    """A tqdm bar on stderr (disabled unless asked for)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=not enabled)


def resume_state(checkpoint: Optional[Checkpoint], expect: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The checkpoint's saved state, after checking it is the same computation as ``expect``."""
    if checkpoint is None:
        return None
    state = checkpoint.load()
    if state is None:
        return None
    diff = sorted(k for k in expect if state.get(k) != expect[k])
    if diff:
        got = ", ".join(f"{k}={state.get(k)!r} (now {expect[k]!r})" for k in diff)
        raise CheckpointError(
            f"checkpoint {checkpoint.path!r} holds another computation: {got}; "
            "rerun with the original arguments, or delete the file to start over"
        )
    return state


