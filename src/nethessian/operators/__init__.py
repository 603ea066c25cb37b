"""Curvature operators: Hessian, generalised Gauss-Newton, Fisher."""
from .base import CurvatureOperator
from .hessian import HessianOperator

__all__ = ["CurvatureOperator", "HessianOperator"]
