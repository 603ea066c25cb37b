"""nethessian: second derivatives of a neural network's cost, exact and matrix-free.

>>> import nethessian as nh
>>> model, loss_fn, data = nh.examples.two_layer(seed=0)
>>> H = nh.hessian(model, loss_fn, data)
>>> H.dense.shape
torch.Size([9, 9])
"""

from __future__ import annotations

from ._version import __version__

from . import distributed, examples, losses
from ._checkpoint import Checkpoint
from ._dense import BlockHessian, hessian
from .distributed import DistributedError, shard
from .errors import (
    CheckpointError,
    DenseTooLargeError,
    InputError,
    NetHessianError,
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    NotSymmetricError,
    RandomModelError,
)
from ._check import CheckReport, Comparison, check
from ._verdict import Verdict, classify_point
from .linalg._density import SpectralDensity, spectral_density
from .linalg._lanczos import EigenResult, eigenvalues
from .linalg._diagonal import DiagonalEstimate, diagonal
from .linalg._solve import SolveResult, inverse_hvp, solve
from .linalg._trace import TraceEstimate, trace
from ._newton import NewtonIteration, NewtonResult, newton
from ._quadratic import NewtonStep, QuadraticComparison, QuadraticModel
from ._influence import InfluenceResult, influence
from ._input_hessian import InputHessian, input_hessian
from ._input_operator import InputHessianOperator, MixedHessian
from ._app.report import ReportPaths, build_report
from ._app.saving import SavedResult, load
from ._objective import Objective
from .operators import CurvatureOperator, HessianOperator, JacobianSandwich
from .operators._fisher import EmpiricalFisherOperator, FisherOperator
from .operators._ggn import GGNOperator
from ._params import ParamLayout

__all__ = [
    "__version__",
    # the problem and its Hessian
    "examples",
    "losses",
    "Objective",
    "ParamLayout",
    "hessian",
    "BlockHessian",
    # operators
    "CurvatureOperator",
    "JacobianSandwich",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "EmpiricalFisherOperator",
    # curvature w.r.t. inputs / activations
    "input_hessian",
    "InputHessian",
    "InputHessianOperator",
    "MixedHessian",
    # validation
    "check",
    "CheckReport",
    "Comparison",
    "Verdict",
    "classify_point",
    # estimators
    "eigenvalues",
    "EigenResult",
    "trace",
    "TraceEstimate",
    "diagonal",
    "DiagonalEstimate",
    "spectral_density",
    "SpectralDensity",
    # the quadratic model, Newton, solves
    "QuadraticModel",
    "QuadraticComparison",
    "NewtonStep",
    "newton",
    "NewtonResult",
    "NewtonIteration",
    "solve",
    "inverse_hvp",
    "SolveResult",
    "influence",
    "InfluenceResult",
    # report and saved results
    "build_report",
    "ReportPaths",
    "load",
    "SavedResult",
    # long runs, many processes
    "Checkpoint",
    "distributed",
    "shard",
    "DistributedError",
    # errors
    "NetHessianError",
    "InputError",
    "NonFiniteError",
    "DenseTooLargeError",
    "NotSymmetricError",
    "RandomModelError",
    "CheckpointError",
    "NotConvergedError",
    "NotConvergedWarning",
]
