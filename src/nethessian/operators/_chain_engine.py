"""The structured Hessian-vector engine as a ``HessianOperator`` candidate (``structured._hvp``).

Offered first for data in memory when the model is an ``nn.Sequential`` of ``nn.Linear`` and
activation modules with a loss that is a sum over samples; its trial computes every batch's
quantities (a batch it cannot take rejects it) and cross-checks its products against
jvp(grad) and central differences like the kept graph's (``_verify_double_backward``).
"""

from __future__ import annotations

from typing import List

from ._engine import Engine, EngineRejected

__all__ = ["chain_engine"]

WHY = "a Linear/activation chain: second-order forward and backward passes on kept per-batch quantities"


def chain_engine(op) -> List[Engine]:
    """``[Engine("structured", ...)]`` for ``op`` (a ``HessianOperator``), or ``[]`` when it does not apply."""
    from ..structured._hvp import Unsupported, offer_hvp

    chain, _ = offer_hvp(op.objective)
    if chain is None:
        return []

    def check():
        try:
            chain.prepare()
        except Unsupported as exc:  # a batch it cannot take: the next engine
            raise EngineRejected(f"structured: {exc}") from None
        op._verify_double_backward(chain.run, "second-order backprop (H v)")

    return [Engine("structured", chain.run, trial=check, keeps_graph=True, why=WHY)]
