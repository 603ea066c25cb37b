"""Which engine computes an exact quantity: ``engine="auto" | "structured" | "autodiff"``.

The capability protocol: ``linalg`` and ``hessian()`` ask ``select(base, engine)``
and get a ``StructuredEngine`` or None with the reason, never touching networks
themselves. A base offers the engine by a ``structured`` attribute (an engine, or a
callable returning one — how ``HessianOperator`` will expose it); until then a
``HessianOperator`` on a plain ``Objective`` is recognised here. Any other base (a
GGN or Fisher operator, a plain matrix, a sharded model) runs on autodiff.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from .. import distributed
from ..errors import InputError
from ._engine import StructuredEngine
from ._graph import Unsupported

__all__ = ["ENGINES", "select"]

ENGINES = ("auto", "structured", "autodiff")


def _engine_for(base: Any, mode: str) -> Tuple[Optional[StructuredEngine], str]:
    try:
        engine, reason = _offered(base)
        if engine is not None:
            engine.check_memory(mode)
        return engine, reason
    except Unsupported as exc:
        return None, str(exc)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:  # a case the rules did not foresee
        return None, f"the structured engine could not set up ({type(exc).__name__}: {exc})"


def _offered(base: Any) -> Tuple[Optional[StructuredEngine], str]:
    offered = getattr(base, "structured", None)
    if offered is not None:
        engine = offered() if callable(offered) and not isinstance(offered, StructuredEngine) else offered
        return engine, "" if engine is not None else "the operator offers no structured engine"
    from .._objective import Objective
    from ..operators._hessian import HessianOperator

    if not isinstance(base, HessianOperator):
        return None, (f"the structured engine computes the Hessian; {type(base).__name__} is another matrix")
    if type(base.objective) is not Objective:
        return None, f"the objective is a {type(base.objective).__name__} (sharded or custom)"
    return StructuredEngine(base.objective), ""


def select(base: Any, engine: str, mode: str = "diagonal") -> Tuple[Optional[StructuredEngine], str]:
    """``(engine or None, why)``: the structured engine when allowed, supported and affordable.

    ``mode`` (``"diagonal"``, ``"blocks"``, ``"dense"``) sets the memory it must fit. For
    ``"dense"``, ``"auto"`` keeps autodiff: measured slower (the per-sample parameter
    Jacobians and mixed terms of the K recursion), so it runs only when forced.

    Raises:
        InputError: an unknown ``engine``, or ``"structured"`` on an unsupported model
            (the message names the first unsupported module).
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(map(repr, ENGINES))}")
    if engine == "autodiff":
        chosen, why = None, "autodiff: engine='autodiff' was requested"
    else:
        found, reason = _engine_for(base, mode)
        if found is None and engine == "structured":
            raise InputError(
                f"engine='structured' cannot run: {reason}. Use engine='auto' (falls back to "
                "autodiff) or engine='autodiff'"
            )
        chosen = found
        why = (
            "structured: every node of the model and the loss has a second-order backpropagation rule"
            if found is not None
            else f"autodiff: {reason}"
        )
        if found is not None and engine == "auto" and mode == "dense":
            chosen, why = (
                None,
                (
                    "autodiff: the model is supported, but the structured dense Hessian is "
                    "slower than Hessian-vector products today (benchmarks/bench_structured.py); "
                    "engine='structured' forces it"
                ),
            )
    distributed.check_same("engine", engine="structured" if chosen is not None else "autodiff")
    return chosen, why
