"""``nh.eigenvalues``'s options: validated numbers, the basis's home and size, the budget, the checkpoint key."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .._checks import as_float, as_int
from ..errors import InputError
from ._operator import Operator

__all__: list = []

_WHICH = ("largest", "smallest", "both", "magnitude")


def _checkpoint_settings(op: Operator, k: int, which: str, b: int, ncv: int, seed, bdtype) -> Dict[str, Any]:
    """What a checkpoint of this run must have been made with (``load_state`` compares it)."""
    expect = {
        "kind": "lanczos",
        "operator": op.fingerprint(),
        "P": op.size,
        "k": k,
        "which": which,
        "block_size": b,
        "ncv": ncv,
        "dtype": str(op.dtype),
        "seed": seed,
    }
    if op.sharded:
        expect.update(global_size=op.global_size, local_range=list(op.local_range))
    if bdtype != op.dtype:
        expect["basis_dtype"] = str(bdtype)
    return expect


def _validate(P: int, k, which: str, tol, block_size):
    """``k``, ``tol`` and ``block_size`` as numbers, after refusing bad values with the fix."""
    if which not in _WHICH:
        raise InputError(f"unknown which={which!r}; choose one of {', '.join(map(repr, _WHICH))}")
    k = as_int("k", k)
    if k < 1 or k >= P:
        raise InputError(
            f"k={k!r} must be an integer with 1 <= k < P = {P} (the operator's size); for so small "
            "a problem form the dense matrix and use torch.linalg.eigvalsh(A_dense)"
        )
    tol = as_float("tol", tol, positive=True)
    if tol >= 1:
        raise InputError(
            f"tol={tol:g} must be below 1: it is the relative accuracy of the eigenvalues "
            "(1e-3 = three digits); tol >= 1 accepts any number"
        )
    return k, tol, as_int("block_size", block_size, minimum=1)


def _basis_home(op: Operator, basis_dtype, basis_device):
    """The basis's dtype and device, after refusing a non-floating dtype."""
    dtype = op.dtype if basis_dtype is None else basis_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise InputError(f"basis_dtype={basis_dtype!r} must be a real floating torch.dtype, e.g. torch.float32")
    try:
        device = op.device if basis_device is None else torch.device(basis_device)
    except (RuntimeError, TypeError):
        raise InputError(f"basis_device={basis_device!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from None
    return dtype, device


def _basis_size(P: int, k: int, b: int, ncv) -> int:
    if ncv is None:
        return max(2 * k + 1, 20, k + 6 * b)
    ncv = as_int("ncv", ncv)
    if ncv < k + b:
        raise InputError(f"ncv={ncv} is too small: it must be at least k + block_size = {k + b}")
    return ncv


def _budget(max_matvecs, ncv: int, k: int, b: int, check_symmetry: bool) -> int:
    if max_matvecs is None:
        return 20 * ncv
    max_matvecs = as_int("max_matvecs", max_matvecs)
    least = -(-k // b) * b + k + (2 if check_symmetry else 0)
    if max_matvecs < least:
        raise InputError(
            f"max_matvecs={max_matvecs} cannot even build and verify {k} Ritz pairs; allow at least {least}"
        )
    return max_matvecs
