"""Which engine computes an exact quantity: ``engine="auto" | "structured" | "autodiff"``.

The capability protocol: ``linalg`` and ``hessian()`` ask ``select(base, engine)``
and get a ``StructuredEngine`` or None with the reason, never touching networks
themselves. A base offers the engine by a ``structured`` attribute — the engine, or
None with the reason in ``structured_reason`` (``HessianOperator`` builds it once,
on first use; a sharded or custom objective gets None). A base without the
attribute (a GGN or Fisher operator, a plain matrix) is another matrix: autodiff.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from .. import distributed
from ..errors import InputError
from ._engine import StructuredEngine
from ._graph import Unsupported

__all__ = ["ENGINES", "offer", "select"]

ENGINES = ("auto", "structured", "autodiff")
_ABSENT = object()
STRUCTURED = "structured: every node of the model and the loss has a second-order backpropagation rule"
KRON = (
    "; every chosen parameter sits in a dense layer (nn.Linear, F.linear, x @ W), so the dense Hessian comes from "
    "Kronecker factors (one GEMM over the samples per pair of layers)"
)


def offer(objective: Any) -> Tuple[Optional[StructuredEngine], str]:
    """``(engine, "")`` for a plain ``Objective`` the rules support, else ``(None, why)``.

    How a ``HessianOperator`` builds its ``structured`` engine (once). A sharded or
    custom objective (another class) is not offered: its batches, sums or parameters
    are not the plain model's.
    """
    from .._objective import Objective

    if type(objective) is not Objective:
        return None, f"the objective is a {type(objective).__name__} (sharded or custom)"
    try:
        return StructuredEngine(objective), ""
    except Unsupported as exc:
        return None, str(exc)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:  # a case the rules did not foresee
        return None, f"the structured engine could not set up ({type(exc).__name__}: {exc})"


def _engine_for(base: Any, mode: str) -> Tuple[Optional[StructuredEngine], str]:
    try:
        engine, reason = _offered(base)
        if engine is not None:
            engine.check_memory(mode)
        return engine, reason
    except Unsupported as exc:
        return None, str(exc)


def _offered(base: Any) -> Tuple[Optional[StructuredEngine], str]:
    engine = getattr(base, "structured", _ABSENT)
    if engine is _ABSENT:
        return None, f"the structured engine computes the Hessian; {type(base).__name__} is another matrix"
    if engine is None:
        return None, getattr(base, "structured_reason", "") or "the operator offers no structured engine"
    return engine, ""


def _checkpointed(engine: str, what: str) -> Tuple[None, str]:
    """A checkpoint belongs to the column-by-column loop: ``"auto"`` takes it, ``"structured"`` is refused."""
    if engine == "structured":
        raise InputError(
            f"{what}: engine='structured' computes it in one pass and takes no checkpoint; "
            "drop the checkpoint, or use engine='autodiff' (column by column, resumable)"
        )
    why = "autodiff: engine='autodiff' was requested"
    if engine == "auto":
        why = (
            "autodiff: a checkpoint was given, and only the column-by-column engine "
            "resumes from one (the structured engine runs in one pass)"
        )
    return None, why


def _dense_choice(found: StructuredEngine, engine: str) -> Tuple[Optional[StructuredEngine], str]:
    if found.kron:
        return found, STRUCTURED + KRON
    if engine == "structured":
        return found, STRUCTURED + f" (dense Hessian from per-sample parameter Jacobians: {found.kron_reason})"
    return None, (
        f"autodiff: the model is supported, but {found.kron_reason}: the structured dense Hessian "
        "would carry per-sample parameter Jacobians, slower than Hessian-vector products "
        "(benchmarks/bench_structured.py); engine='structured' forces it"
    )


def select(
    base: Any, engine: str, mode: str = "diagonal", *, checkpoint: Any = None, what: str = "the result"
) -> Tuple[Optional[StructuredEngine], str]:
    """``(engine or None, why)``: the structured engine when allowed, supported and affordable.

    ``mode`` (``"diagonal"``, ``"blocks"``, ``"dense"``) sets the memory it must fit. For
    ``"dense"``, ``"auto"`` takes the structured engine when every chosen parameter sits
    in a dense layer (Kronecker factors, ``_kron``: faster than Hessian-vector
    products); other supported models keep autodiff (per-sample parameter Jacobians
    are slower), and ``"structured"`` forces them. A ``checkpoint`` belongs to the
    column-by-column loop: ``"auto"`` takes that loop and says so, ``"structured"`` is
    refused rather than the checkpoint ignored (``what`` names the result there).

    Raises:
        InputError: an unknown ``engine``; ``"structured"`` on an unsupported model
            (the message names the first unsupported module) or with a checkpoint.
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(map(repr, ENGINES))}")
    if engine == "autodiff" or checkpoint is not None:
        chosen, why = _checkpointed(engine, what)
    else:
        found, reason = _engine_for(base, mode)
        if found is None and engine == "structured":
            raise InputError(
                f"engine='structured' cannot run: {reason}. Use engine='auto' (falls back to "
                "autodiff) or engine='autodiff'"
            )
        chosen, why = (found, STRUCTURED) if found is not None else (None, f"autodiff: {reason}")
        if found is not None and mode == "dense":
            chosen, why = _dense_choice(found, engine)
    distributed.check_same("engine", engine="structured" if chosen is not None else "autodiff")
    return chosen, why
