"""Helpers shared by the estimators: column chunks, loaded-state checks, the non-convergence warning."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

import torch

from .._checks import all_finite, as_int
from .._columns import column_chunk
from ..errors import CheckpointError
from ..structured import select as select_engine
from ._operator import NotConvergedWarning

__all__ = [
    "chunk_for",
    "exact_engine",
    "loaded_count",
    "loaded_generator",
    "loaded_tensor",
    "resume",
    "warn_not_converged",
]


def chunk_for(P: int, k: int, chunk_size: Any) -> int:
    """Columns per product: ``chunk_size`` (validated) or the one rule, ``_columns.column_chunk``."""
    if chunk_size is None:
        return column_chunk(P, k)
    return as_int("chunk_size", chunk_size, minimum=1)


def exact_engine(base: Any, engine: str, checkpoint: Any, what: str):
    """``(structured engine or None, why)`` for an exact diagonal or trace.

    A checkpoint belongs to the column-by-column loop (the structured engine runs in
    one pass and has nothing to resume): with one, ``"auto"`` takes the column loop and
    says so, and ``"structured"`` is refused rather than the checkpoint ignored
    (``structured.select``).
    """
    return select_engine(base, engine, checkpoint=checkpoint, what=what)


def warn_not_converged(message: str, stacklevel: int = 3) -> None:
    """The one way linalg reports a result with ``converged=False``."""
    warnings.warn(message, NotConvergedWarning, stacklevel=stacklevel)


def _damaged(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path!r}: {what}; the file is damaged or not from this computation, delete it to start over"
    )


def loaded_count(state: Dict[str, Any], key: str, lo: int, hi: int, path: str) -> int:
    """``state[key]`` as an int in ``[lo, hi]``, or ``CheckpointError``."""
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _damaged(path, f"{key} = {value!r} is not a whole number in [{lo}, {hi}]")
    return value


def loaded_tensor(
    state: Dict[str, Any], key: str, shape: Sequence[int], path: str, finite: bool = True
) -> torch.Tensor:
    """``state[key]`` as a tensor of ``shape`` (finite unless told), or ``CheckpointError``."""
    value = state.get(key)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise _damaged(path, f"{key} has shape {got}, expected {tuple(shape)}")
    if not value.is_floating_point() and finite:
        raise _damaged(path, f"{key} has dtype {value.dtype}, expected floating point")
    if finite and not all_finite(value):
        raise _damaged(path, f"{key} contains NaN or Inf")
    return value


def loaded_generator(state: Dict[str, Any], gen: torch.Generator, path: str) -> None:
    """Restore ``gen`` from ``state["generator"]``, or ``CheckpointError``."""
    value = state.get("generator")
    try:
        gen.set_state(value)
    except (TypeError, RuntimeError, ValueError):
        raise _damaged(path, "the saved random generator state is not valid") from None


def resume(checkpoint: Optional[Any], expect: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``checkpoint.resume(expect)`` or ``None`` when there is no checkpoint."""
    return None if checkpoint is None else checkpoint.resume(expect)
