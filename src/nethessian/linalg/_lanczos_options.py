"""``nh.eigenvalues``'s options and schedule.

Validated numbers, the basis's home and size, the budget, the checkpoint key; the Ritz
vectors kept at a restart, when to test for convergence, the expected number of products.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .._checks import as_float, as_int
from ..errors import InputError
from ._operator import Operator

__all__: list = []

_WHICH = ("largest", "smallest", "both", "magnitude")


def _checkpoint_settings(op: Operator, k: int, which: str, b: int, ncv: int, seed, bdtype, checkpoint) -> Dict:
    """What a checkpoint of this run must have been made with (``load_state`` compares it)."""
    expect = {
        "kind": "lanczos",
        "operator": op.key(checkpoint),
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


def _tests_to_skip(bound: float) -> int:
    """Expansions to make before the next stopping test, far from the target.

    The Krylov bound falls by a roughly constant factor per step (linear convergence,
    ~0.9 on a clustered Hessian spectrum, where it then sits 3-100x above the target for
    ~40 steps; its last 3x take 3-5 steps); a bound 3x (30x, 10³x) above the target is
    tested every 2nd (3rd, 4th) step. A run stops at most that many steps late, and only
    if its bound fell that much within them.
    """
    return 0 if bound < 3 else 1 if bound < 30 else 2 if bound < 1e3 else 3


def _kept(k: int, b: int, ncv: int) -> int:
    """Ritz vectors kept at a thick restart: the wanted ``k`` and a buffer of their neighbours."""
    return min(k + max(b, (ncv - k) // 2), ncv - b)


def _expected_total(history, k: int, b: int, max_matvecs: int, previous: Optional[int] = None) -> int:
    """Products the run will likely take: extrapolate the bound's geometric decrease to 1.

    A cycle whose bound did not fall gives no rate: the ``previous`` estimate stands while the
    run has not passed it (a progress bar's total does not jump back to the budget and down again).
    """
    n, bound = history[-1]
    fallback = previous if previous is not None and n < previous <= max_matvecs else max_matvecs
    if len(history) < 2 or not math.isfinite(bound) or not math.isfinite(history[-2][1]):
        return fallback
    n0, bound0 = history[-2]
    rate = (math.log(max(bound0, 1e-300)) - math.log(max(bound, 1e-300))) / max(n - n0, 1)
    if rate <= 0:
        return fallback
    return int(min(max_matvecs, n + math.log(max(bound, 1.0)) / rate + b + k))
