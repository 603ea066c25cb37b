"""Curvature operators: Hessian, generalised Gauss-Newton, Fisher, and the bases to extend.

``CurvatureOperator`` is the base of every operator (products, exports, ``fingerprint``,
``at``); ``JacobianSandwich`` the base of ``Σ_b w_b J_bᵀ M_b J_b`` operators (give it
``_output_op``); ``Engine`` one way to compute products, for the engine policy.
"""

from ._base import CurvatureOperator
from ._engine import Engine
from ._fisher import EmpiricalFisherOperator, FisherOperator
from ._ggn import GGNOperator, JacobianSandwich
from ._hessian import HessianOperator

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "Engine",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "JacobianSandwich",
]
