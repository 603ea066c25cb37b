"""Exact second-order backpropagation: the Hessian's diagonal, blocks and dense matrix.

For models whose forward is a graph of supported modules (``_rules``), the chain rule
for second derivatives runs backwards per sample (``_backprop``), starting from the
loss's per-sample Hessian (``_loss``). ``select`` decides, per call, between this
engine and autodiff (``engine="auto" | "structured" | "autodiff"``); a base offers the
engine through its ``structured`` attribute (``HessianOperator``: built by ``offer``).
"""

from ._engine import StructuredEngine
from ._graph import Unsupported
from ._select import ENGINES, offer, select

__all__ = ["ENGINES", "StructuredEngine", "Unsupported", "offer", "select"]
