"""Curvature operators: Hessian, generalised Gauss-Newton, Fisher."""
from ._base import CurvatureOperator
from ._hessian import HessianOperator

__all__ = ["CurvatureOperator", "HessianOperator"]
