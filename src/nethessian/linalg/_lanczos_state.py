"""Checkpoints of thick-restart Lanczos: save the Krylov state, resume it after validating every field.

A state holds the basis ``V`` (P x ncv), ``j``, ``H`` (j x j), the next block
``F`` (P x b), ``S`` (b x j), the generator and the product count; a finished
run also holds its verified result, so asking again costs no product. Loading
goes through ``Checkpoint.resume`` (refusing another operator, size or seed) and
then checks shapes, finiteness and counts: a damaged file is a
``CheckpointError``, never a raw ``KeyError`` or a NaN returned as a result.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ._eigen_result import EigenResult
from ._operator import Operator
from ._restart import _Krylov, _like
from ._util import loaded_count, loaded_generator, loaded_tensor, resume

__all__ = ["load_state", "save_state"]


def save_state(
    checkpoint: Any,
    kry: _Krylov,
    expect: Dict[str, Any],
    op: Operator,
    result: Optional[Tuple[EigenResult, float, int]] = None,
) -> None:
    """Write the Krylov state (throttled), or, with ``result``, the final state (always)."""
    if checkpoint is None or (result is None and not checkpoint.due()):
        return
    state = {
        **expect,
        "V": kry.V.cpu().contiguous(),  # row-major on disk (the live basis is stored by columns)
        "j": kry.j,
        "H": kry.H,
        "F": kry.F.to("cpu", copy=True),  # not a view: F may live in the basis's next column
        "S": kry.S,
        "generator": kry.gen.get_state(),
        "num_matvecs": op.num_matvecs,
    }
    if result is not None:
        res, tol, budget = result
        state["result"] = {
            "eigenvalues": res.eigenvalues,
            "eigenvectors": res.eigenvectors.cpu(),
            "residuals": res.residuals,
            "converged": bool(res.converged),
            "num_matvecs": res.num_matvecs,
            "tol": tol,
            "max_matvecs": budget,
        }
    checkpoint.save(state, force=True)


def load_state(
    checkpoint: Any,
    expect: Dict[str, Any],
    op: Operator,
    gen: torch.Generator,
    k: int,
    tol: float,
    max_matvecs: int,
    basis=None,
):
    """``(Krylov state or None, finished EigenResult or None)`` from ``checkpoint``."""
    state = resume(checkpoint, expect)
    if state is None:
        return None, None
    path, P, ncv, b = checkpoint.path, expect["P"], expect["ncv"], expect["block_size"]
    j = loaded_count(state, "j", 0, ncv, path)
    V = loaded_tensor(state, "V", (P, ncv), path)
    H = loaded_tensor(state, "H", (j, j), path)
    F = loaded_tensor(state, "F", (P, b), path)
    S = loaded_tensor(state, "S", (b, j), path)
    loaded_generator(state, gen, path)
    op.num_matvecs = loaded_count(state, "num_matvecs", 0, 2**62, path)
    bdtype, bdevice = basis if basis is not None else (op.dtype, op.device)
    kry = _Krylov(V.to(bdtype).to(bdevice), j, H.double(), _like(F, op), S.double(), gen, op.dtype)
    return kry, _finished(state, expect, op, k, tol, max_matvecs, path)


def _finished(state, expect, op: Operator, k: int, tol: float, max_matvecs: int, path: str):
    """The saved final result when it answers this very call (same tol and budget), else ``None``."""
    done = state.get("result")
    if not isinstance(done, dict) or done.get("tol") != tol or done.get("max_matvecs") != max_matvecs:
        return None
    vals = loaded_tensor(done, "eigenvalues", (k,), path)
    vecs = loaded_tensor(done, "eigenvectors", (expect["P"], k), path)
    res = loaded_tensor(done, "residuals", (k,), path)
    spent = loaded_count(done, "num_matvecs", 0, 2**62, path)
    return EigenResult(
        vals.double(),
        _like(vecs, op),
        res.double(),
        spent,
        bool(done.get("converged")),
        op.layout,
        expect["which"],
        precision_note=op.precision_note,
    )
