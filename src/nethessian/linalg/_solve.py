"""Matrix-free solves of ``(A + λI) x = b``: conjugate gradients and MINRES.

``A`` is anything square with ``@`` (a curvature operator or a plain symmetric
tensor). Vectors stay on the operator's device in its dtype; the Krylov scalars
(step lengths, Lanczos coefficients, rotations, residual norms) are float64.

* ``method="cg"`` — Hestenes & Stiefel (1952), for ``A + λI`` positive definite.
  It stops, rather than return garbage, at the first search direction with
  ``pᵀ(A + λI)p ≤ ε‖A + λI‖‖p‖²`` (ε the dtype's machine epsilon, ``‖A + λI‖``
  estimated by the largest ``‖(A + λI)p‖/‖p‖`` seen).
* ``method="minres"`` — Paige & Saunders (1975), "Solution of sparse indefinite
  systems of linear equations", SIAM J. Numer. Anal. 12(4); the Lanczos
  recurrence with Givens rotations as in SOL's / scipy's ``minres``, for any
  symmetric ``A + λI``. Its residual estimate ``φ̄ₖ`` is non-increasing.

Every answer is verified: when the recurrence reports ``‖r‖ ≤ tol·‖b‖`` the true
residual ``b − (A + λI)x`` is computed; if it is larger (rounding drift) the
method restarts from the current ``x`` (at most ``_MAX_RESTARTS`` times), so
``converged=True`` always means the *true* relative residual is ``≤ tol``.

Non-convergence (the linalg convention): ``solve`` returns its ``SolveResult``
with ``converged=False`` and issues a ``NotConvergedWarning``; ``inverse_hvp``,
which returns a bare tensor, raises ``NotConvergedError`` with the result attached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Literal, Mapping, Optional, Union

import torch

from .. import distributed
from .._fingerprint import Hasher
from .._checks import all_finite, as_float, as_int, check_vector
from ..errors import InputError, NonFiniteError, NotConvergedError
from ._operator import Operator, as_operator
from ._util import warn_not_converged

__all__ = ["SolveResult", "solve", "inverse_hvp"]

METHODS = ("cg", "minres")
_MAX_RESTARTS = 3
_MAXITER_CAP = 10_000
Vector = Union[torch.Tensor, Mapping[str, torch.Tensor]]


@dataclass(frozen=True, repr=False)
class SolveResult:
    """Outcome of :func:`solve`.

    ``residuals[0]`` is ``‖b − (A + λI)x₀‖/‖b‖`` and ``residuals[k]`` the method's
    estimate after iteration ``k`` (float64, CPU; MINRES's is non-increasing except
    where a restart resumes from the larger true residual); ``final_residual`` is
    the *true* relative residual of ``x``, computed at the end. ``curvature_direction``
    is the unit ``p`` with ``pᵀ(A + λI)p ≤ 0`` when ``status == "negative_curvature"``.
    ``memory_bytes`` bounds the vectors held per rank (CG 6, MINRES 10 of them);
    ``precision_note`` is the operator's half-precision caveat, or ``None``.
    """

    x: torch.Tensor
    converged: bool
    residuals: torch.Tensor
    final_residual: float
    num_matvecs: int
    iterations: int
    status: str
    message: str
    method: str
    damping: float
    tol: float
    curvature_direction: Optional[torch.Tensor] = None
    memory_bytes: Optional[int] = None
    precision_note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python types only, ready for ``json.dumps``."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["x"] = self.x.detach().cpu().double().tolist()
        d["residuals"] = self.residuals.tolist()
        if self.curvature_direction is not None:
            d["curvature_direction"] = self.curvature_direction.detach().cpu().double().tolist()
        return d

    def __repr__(self) -> str:
        return (
            f"SolveResult({self.method}, status={self.status!r}, converged={self.converged}, "
            f"final_residual={self.final_residual:.3e}, tol={self.tol:.1e}, iterations={self.iterations}, "
            f"num_matvecs={self.num_matvecs}, damping={self.damping:g}, x=<({self.x.numel()},) "
            f"{str(self.x.dtype).replace('torch.', '')}>)"
        )


def _dotter(op: Operator) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``uᵀv`` in float64 through the adapter (summed over the ranks of a sharded operator)."""
    return lambda u, v: float(op.dot(u, v, dtype=torch.float64))


def _flat(op: Operator, v: Any, name: str) -> torch.Tensor:
    """``v`` (flat tensor, or dict of named tensors when ``op`` has a layout) as a finite (P,) tensor."""
    if isinstance(v, Mapping):
        if op.layout is None:
            raise InputError(
                f"{name} is a dict of named tensors but the operator has no .layout (ParamLayout); "
                f"pass a flat tensor of shape ({op.size},)"
            )
        v = op.layout.flatten(v)
    if isinstance(v, torch.Tensor) and v.ndim == 1 and v.shape[0] != op.size:
        raise InputError(f"{name} has {v.shape[0]} entries but the operator has size P = {op.size}")
    if isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[0] == op.size:
        raise InputError(
            f"{name} must be a flat vector of shape ({op.size},), got shape {tuple(v.shape)}; "
            "several right-hand sides are not supported: solve one column at a time"
        )
    check_vector(v, op.size, name)  # a tensor: dense, real, floating point, (P,) or (P, k), finite
    if v.ndim != 1:
        raise InputError(f"{name} must be a flat vector of shape ({op.size},), got shape {tuple(v.shape)}")
    out = v.to(device=op.device, dtype=op.dtype)
    if out.dtype != v.dtype and not all_finite(out):  # finite before, not after the cast: overflow
        bad = int((~torch.isfinite(out)).sum())
        raise NonFiniteError(
            f"{name} has {bad} non-finite (overflowing) entries in the operator's dtype "
            f"{op.dtype}; scale it down or use a float64 operator"
        )
    return out


def _cg(apply, x, r, eps, _dot):
    """Hestenes–Stiefel CG. Yields ``(x, ‖r‖, None)`` per step, or ``(x, None, (p̂, curvature))`` and stops."""
    p, rho, scale = r, _dot(r, r), 0.0
    while rho > 0:
        q = apply(p)
        pp, pq = _dot(p, p), _dot(p, q)
        scale = max(scale, math.sqrt(_dot(q, q) / pp))
        if pq <= eps * scale * pp:  # non-positive curvature at working precision
            yield x, None, (p / math.sqrt(pp), pq / pp)
            return
        alpha = rho / pq
        x, r = x + alpha * p, r - alpha * q
        rho, rho_old = _dot(r, r), rho
        yield x, math.sqrt(rho), None
        p = r + (rho / rho_old) * p


def _minres(apply, x, r, eps, _dot):
    """Paige–Saunders MINRES. Yields ``(x, φ̄, None)`` per step; returns when the Krylov space is invariant."""
    beta = math.sqrt(_dot(r, r))
    y, r1, r2 = r, r, r
    oldb, dbar, epsln, phibar, cs, sn, tnorm2 = 0.0, 0.0, 0.0, beta, -1.0, 0.0, 0.0
    w = w2 = torch.zeros_like(x)
    k = 0
    while True:
        k += 1
        v = y / beta  # Lanczos: beta_{k+1} v_{k+1} = A v_k - alpha_k v_k - beta_k v_{k-1}
        y = apply(v)
        if k >= 2:
            y = y - (beta / oldb) * r1
        alfa = _dot(v, y)
        y = y - (alfa / beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, math.sqrt(_dot(y, y))
        tnorm2 += alfa**2 + beta**2 + (oldb**2 if k >= 2 else 0.0)  # ‖T̄ₖ‖_F² estimates ‖A‖² (not ‖r₀‖)
        # apply the previous rotation, then a new one annihilating beta_{k+1}
        oldeps = epsln
        delta, gbar = cs * dbar + sn * alfa, sn * dbar - cs * alfa
        epsln, dbar = sn * beta, -cs * beta
        gamma = math.hypot(gbar, beta)
        if gamma <= eps * math.sqrt(tnorm2):  # beta = 0 and T_k singular: b is not in the range of A
            return  # x_{k-1} already minimises the residual over the invariant Krylov space
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        yield x, phibar, None
        if beta <= eps * math.sqrt(tnorm2):  # invariant Krylov space (Lanczos breakdown)
            return


def _message(status, method, rel, tol, it, maxiter, damping, dtype, detail=None) -> str:
    res = f"true relative residual ‖b − (A + λI)x‖/‖b‖ = {rel:.3e}"
    if status == "converged":
        return f"{method} converged in {it} iterations: {res} ≤ tol = {tol:.1e}"
    if status == "maxiter":
        return (
            f"{method} did not converge in maxiter = {maxiter} iterations: {res} > tol = {tol:.1e}; "
            "raise maxiter, add damping (better conditioning) or loosen tol"
        )
    if status == "negative_curvature":
        return (
            f"cg met non-positive curvature pᵀ(A + λI)p/‖p‖² = {detail:.3e} at iteration {it + 1}: "
            f"A + λI (λ = {damping:g}) is not positive definite; use method='minres' for symmetric "
            f"indefinite systems or a larger damping. x is the last iterate before that direction ({res})"
        )
    if detail == "invariant":
        return (
            f"minres: the Krylov space became invariant (Lanczos breakdown) after {it} iterations with "
            f"{res} > tol = {tol:.1e}: A + λI (λ = {damping:g}) is singular and b is not in its range; "
            "add damping"
        )
    return (
        f"{method}: the recurrence reached tol but the {res} stayed above tol = {tol:.1e} after "
        f"{_MAX_RESTARTS} restarts: the attainable accuracy in {dtype} is reached; loosen tol, use "
        "float64 or add damping"
    )


def _solve_options(op, method, damping, tol, maxiter, callback):
    """The checked ``(damping, tol, maxiter)`` of a solve, compared across ranks."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; valid methods: {', '.join(map(repr, METHODS))}")
    damping, tol = as_float("damping", damping), as_float("tol", tol)
    if tol < 0:
        raise InputError(f"tol must be a finite number ≥ 0 (relative to ‖b‖), got {tol}")
    maxiter = min(10 * op.global_size, _MAXITER_CAP) if maxiter is None else as_int("maxiter", maxiter, minimum=0)
    distributed.check_same("solve", method=method, maxiter=maxiter, damping=damping, tol=tol)
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be callable as callback(iteration, x, residual), got {callback!r}")
    return damping, tol, maxiter


def _result_maker(op, method, damping, tol, maxiter):
    """``result(x, rels, status, rel, it, detail, direction)``: the ``SolveResult`` of a solve that ends now."""

    def result(x, rels, status, rel, it, detail=None, direction=None):
        msg = _message(status, method, rel, tol, it, maxiter, damping, op.dtype, detail)
        return SolveResult(
            x,
            status == "converged",
            torch.tensor(rels, dtype=torch.float64),
            rel,
            op.num_matvecs,
            it,
            status,
            msg,
            method,
            damping,
            tol,
            direction,
            op.size * (6 if method == "cg" else 10) * x.element_size(),
            op.precision_note,
        )

    return result


def _solve(op, b, *, damping, method, tol, maxiter, x0, callback) -> SolveResult:
    op = as_operator(op)
    damping, tol, maxiter = _solve_options(op, method, damping, tol, maxiter, callback)
    b = _flat(op, b, "b")
    x = torch.zeros_like(b) if x0 is None else _flat(op, x0, "x0")
    if not op.sharded:  # the same system on every rank (a sharded b differs by design)
        distributed.check_same(
            "solve", b=Hasher().tensor(b).hexdigest(), x0=None if x0 is None else Hasher().tensor(x).hexdigest()
        )
    _dot = _dotter(op)
    result = _result_maker(op, method, damping, tol, maxiter)

    def apply(v):
        return op @ v + damping * v if damping else op @ v

    bnorm = math.sqrt(_dot(b, b))
    if bnorm == 0:  # the solution of a non-singular system with b = 0 is 0
        return result(torch.zeros_like(b), [0.0], "converged", 0.0, 0)
    r = b if x0 is None else b - apply(x)
    rel = math.sqrt(_dot(r, r)) / bnorm
    rels, it, restarts = [rel], 0, 0
    kernel = _cg if method == "cg" else _minres
    eps = torch.finfo(op.dtype).eps
    while True:
        if rel <= tol:
            return result(x, rels, "converged", rel, it)
        if it >= maxiter:
            return result(x, rels, "maxiter", rel, it)
        event, exhausted = None, True
        for x_new, est, event in kernel(apply, x, r, eps, _dot):
            x = x_new
            if event is not None:
                break
            it += 1
            rels.append(est / bnorm)
            if callback is not None:
                callback(it, x, est / bnorm)
            if est <= tol * bnorm or it >= maxiter:
                exhausted = False
                break
        r = b - apply(x)  # verify with the true residual
        rel = math.sqrt(_dot(r, r)) / bnorm
        if event is not None:
            return result(x, rels, "negative_curvature", rel, it, event[1], event[0])
        if rel > tol and exhausted:
            return result(x, rels, "breakdown", rel, it, "invariant")
        if rel > tol and it < maxiter:
            restarts += 1
            if restarts > _MAX_RESTARTS:
                return result(x, rels, "breakdown", rel, it, "stagnation")


def solve(
    op: Any,
    b: Vector,
    *,
    damping: float = 0.0,
    method: Literal["cg", "minres"] = "cg",
    tol: float = 1e-6,
    maxiter: Optional[int] = None,
    x0: Optional[Vector] = None,
    callback: Optional[Callable[[int, torch.Tensor, float], Any]] = None,
) -> SolveResult:
    """Solve ``(A + λI) x = b`` matrix-free, with ``λ = damping``.

    Args:
        op: square ``(P, P)`` operator or symmetric tensor (anything with ``@``).
        b: right-hand side, flat ``(P,)``, or a dict of named tensors when ``op`` has a ``.layout``.
        damping: ``λ``; may be negative (CG then reports ``negative_curvature`` if ``A + λI`` is indefinite).
        method: ``"cg"`` (``A + λI`` positive definite) or ``"minres"`` (any symmetric ``A + λI``).
        tol: stop when ``‖b − (A + λI)x‖ ≤ tol·‖b‖`` (verified with the true residual).
        maxiter: most Krylov iterations in all; default ``min(10·P, 10 000)``.
        x0: starting guess (flat or named, like ``b``); default zero.
        callback: ``callback(iteration, x, relative_residual_estimate)`` after every iteration; ``x`` is
            a fresh tensor each time (keeping it is safe).

    Returns:
        :class:`SolveResult` with ``x`` flat ``(P,)``. ``num_matvecs`` counts every product: one per
        iteration, one per true-residual check (at the end and at each restart), one for ``x0``.
        A result with ``converged=False`` also emits a ``NotConvergedWarning`` carrying its ``message``.
        ``b = 0`` gives ``x = 0`` (whatever ``x0``) with no product.

    Raises:
        InputError: unknown method, ``tol < 0``, non-finite damping, ``b`` or ``x0`` of the wrong shape.
        NonFiniteError: ``b`` or ``x0`` holds NaN/Inf, or a product with ``op`` does.

    >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
    >>> res = solve(A, torch.tensor([1., 2.], dtype=torch.float64))   # x = (1/11, 7/11)
    >>> res.status, res.iterations, torch.allclose(res.x, torch.tensor([1 / 11, 7 / 11], dtype=torch.float64))
    ('converged', 2, True)
    >>> res = solve(A, torch.tensor([1., 2.], dtype=torch.float64), damping=1.0)  # (A + I) x = b
    >>> torch.allclose(res.x, torch.tensor([2 / 19, 9 / 19], dtype=torch.float64))
    True
    >>> D = torch.diag(torch.tensor([2., -1.], dtype=torch.float64))  # indefinite: MINRES
    >>> [round(t, 12) for t in solve(D, torch.tensor([2., 1.], dtype=torch.float64), method="minres").x.tolist()]
    [1.0, -1.0]
    """
    res = _solve(op, b, damping=damping, method=method, tol=tol, maxiter=maxiter, x0=x0, callback=callback)
    if not res.converged:
        warn_not_converged(res.message)
    return res


def inverse_hvp(
    op: Any,
    v: Vector,
    *,
    damping: float = 0.0,
    method: Literal["cg", "minres"] = "cg",
    tol: float = 1e-8,
    maxiter: Optional[int] = None,
) -> torch.Tensor:
    """``(A + λI)⁻¹ v``, the inverse-Hessian-vector product of influence functions.

    Koh & Liang (2017), "Understanding black-box predictions via influence functions", ICML:
    ``I(z, z_test) = −∇L(z_test)ᵀ H⁻¹ ∇L(z)``; a damping ``λ > 0`` makes a non-convex ``H`` invertible.

    Returns:
        ``x`` flat ``(P,)`` (``op.layout.unflatten(x)`` names it).

    Raises:
        InputError: as :func:`solve`.
        NotConvergedError: the solve did not converge; the message gives the status, the residual
            and a remedy, and the exception's ``.result`` holds the :class:`SolveResult`.

    >>> A = torch.tensor([[2., 0.], [0., 4.]], dtype=torch.float64)
    >>> inverse_hvp(A, torch.tensor([1., 1.], dtype=torch.float64)).tolist()
    [0.5, 0.25]
    """
    res = _solve(op, v, damping=damping, method=method, tol=tol, maxiter=maxiter, x0=None, callback=None)
    if not res.converged:
        raise NotConvergedError(
            f"inverse_hvp failed ({res.status}): {res.message}. Remedies: increase damping "
            "(conditioning), increase maxiter, or use method='minres' for an indefinite H",
            res,
        )
    return res.x
