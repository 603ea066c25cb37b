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
                     NonFiniteError, NotSymmetricError, RandomModelError)
from .objective import Objective
from .operators import CurvatureOperator, HessianOperator
from .params import ParamLayout

__all__ = [
    # the problem and its Hessian
    "examples", "Objective", "ParamLayout", "hessian", "BlockHessian",
    # operators
    "CurvatureOperator", "HessianOperator",
    # long runs, many processes
    "Checkpoint", "distributed", "shard", "DistributedError",
    # errors
    "NetHessianError", "InputError", "NonFiniteError", "DenseTooLargeError",
    "NotSymmetricError", "RandomModelError", "CheckpointError",
]
