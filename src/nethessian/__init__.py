"""nethessian: second derivatives of a neural network's cost, exact and matrix-free.

>>> import nethessian as nh
>>> model, loss_fn, data = nh.examples.two_layer(seed=0)
>>> H = nh.hessian(model, loss_fn, data)
>>> H.dense.shape
torch.Size([9, 9])
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import distributed, examples
from .checkpoint import Checkpoint
from .dense import BlockHessian, hessian
from .distributed import DistributedError, shard
from .errors import (CheckpointError, DenseTooLargeError, InputError, NetHessianError,
                     NonFiniteError, NotConvergedError, NotSymmetricError, RandomModelError)
from .check import CheckReport, check
from .linalg.density import SpectralDensity, spectral_density
from .linalg.lanczos import EigenResult, eigenvalues
from .linalg.diagonal import DiagonalEstimate, diagonal
from .linalg.solve import SolveResult, inverse_hvp, solve
from .linalg.trace import TraceEstimate, trace
from .newton import NewtonIteration, NewtonResult, newton
from .quadratic import NewtonStep, QuadraticComparison, QuadraticModel
from .report import ReportPaths, build_report
from .saving import SavedResult, load
from .objective import Objective
from .operators import CurvatureOperator, HessianOperator
from .operators.fisher import EmpiricalFisherOperator, FisherOperator
from .operators.ggn import GGNOperator
from .params import ParamLayout

__all__ = [
    # the problem and its Hessian
    "examples", "Objective", "ParamLayout", "hessian", "BlockHessian",
    # operators
    "CurvatureOperator", "HessianOperator", "GGNOperator", "FisherOperator", "EmpiricalFisherOperator",
    # validation
    "check", "CheckReport",
    # estimators
    "eigenvalues", "EigenResult", "trace", "TraceEstimate", "diagonal", "DiagonalEstimate", "spectral_density", "SpectralDensity",
    # the quadratic model, Newton, solves
    "QuadraticModel", "QuadraticComparison", "NewtonStep", "newton", "NewtonResult", "NewtonIteration",
    "solve", "inverse_hvp", "SolveResult",
    # report and saved results
    "build_report", "ReportPaths", "load", "SavedResult",
    # long runs, many processes
    "Checkpoint", "distributed", "shard", "DistributedError",
    # errors
    "NetHessianError", "InputError", "NonFiniteError", "DenseTooLargeError",
    "NotSymmetricError", "RandomModelError", "CheckpointError", "NotConvergedError",
]
