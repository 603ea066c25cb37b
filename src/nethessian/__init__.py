"""nethessian: second derivatives of a neural network's cost, exact and matrix-free."""
from __future__ import annotations

__version__ = "0.1.0"
