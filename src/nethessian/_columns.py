"""The one loop over identity columns: dense matrices and exact diagonals, chunked, resumable.

``to_dense``, the exact diagonal, Lanczos' dense path and ``check`` all need
``A e_j`` for every j. They go through ``identity_columns``, which applies ``A``
to chunks of identity columns, shows progress, and checkpoints what is done so
that a killed run resumes where it stopped. What a checkpoint holds is validated
on load (shape, finiteness, count in range) before it is trusted.

``column_chunk`` is the one rule for how many columns go through a product at once.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Literal, Optional

import torch

from ._checks import all_finite
from ._progress import Progress
from .errors import CheckpointError

__all__ = ["VECTOR_BLOCK_ELEMENTS", "column_chunk", "identity_columns"]

VECTOR_BLOCK_ELEMENTS = 2**24  # entries of one (P, chunk) block of vectors: 64 MiB in float32
MAX_CHUNK = 256  # more columns per product saves no time on a CPU (FACTS.md)


def column_chunk(
    P: int, k: Optional[int] = None, *, bytes_per_column: Optional[float] = None, budget_bytes: float = 2**30
) -> int:
    """How many of ``k`` columns to push through one product.

    The ``(P, chunk)`` block of vectors stays under 2**24 entries and 256 columns;
    when the engine's memory per column is known (activations kept per vmapped
    column), the chunk also keeps ``chunk × bytes_per_column`` under ``budget_bytes``.

    >>> column_chunk(5018), column_chunk(109386), column_chunk(10**8)
    (256, 153, 1)
    >>> column_chunk(5018, 32), column_chunk(5018, bytes_per_column=64 * 2**20)
    (32, 16)
    """
    c = max(1, min(MAX_CHUNK, VECTOR_BLOCK_ELEMENTS // max(int(P), 1)))
    if bytes_per_column:
        c = max(1, min(c, int(budget_bytes // max(bytes_per_column, 1.0))))
    return c if k is None else max(1, min(c, int(k)))


def identity_columns(
    apply: Callable[[torch.Tensor], torch.Tensor],
    P: int,
    *,
    dtype: torch.dtype,
    device,
    chunk: int,
    keep: Literal["all", "diagonal"] = "all",
    checkpoint=None,
    identity: Optional[Dict[str, Any]] = None,
    progress: Optional[bool] = None,
    desc: str = "dense columns",
) -> torch.Tensor:
    """``A`` as a dense ``(P, P)`` matrix (``keep="all"``) or its diagonal ``(P,)``, from ``apply(E)``.

    Args:
        apply: ``E (P, c) -> A E (P, c)``.
        P: the matrix's size.
        dtype: dtype of the identity columns and the result.
        device: where they live.
        chunk: identity columns per call of ``apply``.
        keep: ``"all"`` (the dense matrix) or ``"diagonal"`` (its diagonal only).
        checkpoint: a ``Checkpoint`` to save finished chunks to and resume from.
        identity: what the result depends on (operator fingerprint, ...), stored in
            the checkpoint and compared on resume.
        progress: ``None`` auto, ``True``/``False`` (see ``nethessian._progress``).
        desc: the progress display's label.
    """
    expect = {"kind": f"identity-columns-{keep}", "size": int(P), **(identity or {})}
    shape = (P, P) if keep == "all" else (P,)
    out = torch.zeros(shape, dtype=dtype, device=device)
    done = 0
    state = checkpoint.resume(expect) if checkpoint is not None else None
    if state is not None:
        done = _validated_done(state, P, keep, checkpoint.path)
        vals = state["values"]
        if done:
            (out[:, :done] if keep == "all" else out[:done]).copy_(vals.to(device=device, dtype=dtype))
    with Progress(P, desc, unit="col", enabled=progress, initial=done) as bar:
        while done < P:
            stop = min(P, done + chunk)
            rows = torch.arange(done, stop, device=device)
            cols = torch.arange(stop - done, device=device)
            E = torch.zeros(P, stop - done, dtype=dtype, device=device)
            E[rows, cols] = 1
            AE = apply(E)
            if keep == "all":
                out[:, done:stop] = AE
            else:
                out[done:stop] = AE[rows, cols]
            bar.update(stop - done)
            done = stop
            if checkpoint is not None and (done == P or checkpoint.due()):
                vals = out[:, :done] if keep == "all" else out[:done]
                checkpoint.save({**expect, "done": done, "values": vals.cpu()}, force=True)
    return out


def _validated_done(state: Dict[str, Any], P: int, keep: str, path: str) -> int:
    """The number of finished columns in a loaded state, after checking the state is sound."""
    done, vals = state.get("done"), state.get("values")
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= P:
        raise CheckpointError(
            f"{path!r}: column count {done!r} is not in [0, {P}]; the file is damaged, delete it to start over"
        )
    want = (P, done) if keep == "all" else (done,)
    if not isinstance(vals, torch.Tensor) or tuple(vals.shape) != want:
        got = tuple(vals.shape) if isinstance(vals, torch.Tensor) else type(vals).__name__
        raise CheckpointError(
            f"{path!r}: saved columns have shape {got}, expected {want}; the file is damaged, delete it to start over"
        )
    if not all_finite(vals):
        raise CheckpointError(
            f"{path!r}: saved columns contain NaN or Inf; the file is damaged, delete it to start over"
        )
    return done
