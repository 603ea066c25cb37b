"""Exceptions raised by nethessian.

Every error says what is wrong and how to fix it. They subclass ``ValueError``
(bad input) or ``RuntimeError`` (a computation that went wrong), so callers who
catch the builtin types keep working.
"""

from __future__ import annotations

__all__ = [
    "NetHessianError",
    "InputError",
    "NonFiniteError",
    "DenseTooLargeError",
    "NotSymmetricError",
    "CheckpointError",
    "RandomModelError",
    "NotConvergedError",
    "DistributedError",
    "NotConvergedWarning",
]


class NetHessianError(Exception):
    """Base class of every error nethessian raises on purpose."""


class InputError(NetHessianError, ValueError):
    """The user's model, loss, data or options cannot give a well-defined answer."""


class NonFiniteError(NetHessianError, RuntimeError):
    """A NaN or Inf appeared in data, parameters or an intermediate product."""


class DenseTooLargeError(InputError):
    """A dense P x P matrix was requested that exceeds the memory limit."""


class NotSymmetricError(InputError):
    """An algorithm that needs a symmetric operator was given a non-symmetric one."""


class CheckpointError(InputError):
    """A checkpoint file is corrupt, foreign, or was made with other settings."""


class RandomModelError(InputError):
    """The model's forward pass draws random numbers (dropout in train mode, ...)."""


class NotConvergedError(NetHessianError, RuntimeError):
    """An iterative method stopped before reaching its tolerance (the result is attached)."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class DistributedError(NetHessianError, RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or ranks disagree."""


class NotConvergedWarning(UserWarning):
    """An iterative method returned a result with ``converged=False`` (the result says how far it got).

    The convention: a result that carries a ``converged`` flag (``EigenResult``,
    ``SolveResult``, ``NewtonResult``) warns with this class; a function that returns a
    bare tensor (``inverse_hvp``, ``QuadraticModel.newton_step``'s solve) raises
    ``NotConvergedError`` with the result attached.
    """
