"""Influence of every training point on a test loss (Koh & Liang 2017), one inverse-HVP solve.

Convention. The training cost is nethessian's ``J(θ) = Σ_i w_i ℓ_i(θ)`` over the
training data: ``ℓ_i`` is ``loss_fn`` on sample ``i`` alone and ``w_i`` its weight in J —
``c_i / Σ_j c_j`` for a mean-reduced loss (``c_i`` the sample's number of loss terms,
e.g. its non-ignored tokens; ``1/N`` for one term per sample) and ``1`` for
reduction ``"sum"``. With ``H = ∇²J(θ̂)``, ``λ`` the damping and ``L_test`` the test cost,

    s = (H + λI)⁻¹ ∇L_test(θ̂)                      (one solve, shared by every point)
    score_i = I(z_i, z_test) = −∇ℓ_i(θ̂)ᵀ s          (Koh & Liang's I_up,loss)

``score_i = dL_test/dε`` when sample ``i``'s weight is raised from ``w_i`` to ``w_i + ε``
(exactly, for λ = 0 at a minimum θ̂). Removing the sample is ``ε = −w_i``, so the
predicted leave-one-out change of the test loss is ``ΔL_test ≈ −w_i · score_i``
(``removal_effect``), and θ moves by ``≈ w_i (H + λI)⁻¹ ∇ℓ_i``.

**Helpful** points have ``score_i < 0``: up-weighting them lowers the test loss and
removing them raises it. **Harmful** points have ``score_i > 0``.

Damping. ``λ > 0`` shrinks the component of ``s`` along an eigenvector of ``H`` with
eigenvalue ``μ`` by ``μ / (μ + λ)``. Its effect is reported as the elasticity
``damping_sensitivity = ‖d scores / d log λ‖ / ‖scores‖ = ‖λ G t‖ / ‖G s‖`` (``G`` the
per-sample gradients, ``t = (H + λI)⁻¹ s``; exact since ``ds/dλ = −t``; one more solve):
0.01 means a 10 % change of λ moves the scores by about 0.1 %; near 1 they say more about
λ than about the model. ``H + λI`` not positive definite is an error (``method="minres"``:
a warning) naming the damping that fixes it. The result type, ``InfluenceResult``, lives in
``_influence_result.py``.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Literal, Optional, Sequence

import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import distributed as dist
from ._checks import all_finite, as_float, as_int
from ._columns import column_chunk
from ._data import Batch, term_count
from ._influence_result import InfluenceResult
from ._objective import Objective
from ._progress import Progress
from .errors import InputError, NonFiniteError, NotConvergedError
from .linalg._solve import _solve
from .operators import HessianOperator

__all__ = ["InfluenceResult", "influence", "per_sample_gradients"]

METHODS = ("auto", "cg", "minres", "dense")
AUTO_DENSE_MAX = 512  # method="auto": exact eigen-decomposition up to this many parameters
_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# -- per-sample gradients ------------------------------------------------------------------
def _check_sample_dims(batch: Batch) -> int:
    """Samples in ``batch``: every input tensor must have the targets' leading size."""
    t = batch.targets
    if t.ndim == 0:
        raise InputError(f"batch {batch.index}: targets are a scalar; influence needs one per sample")
    n = t.shape[0]
    for x in tree_flatten(batch.inputs)[0]:
        if isinstance(x, torch.Tensor) and (x.ndim == 0 or x.shape[0] != n):
            raise InputError(
                f"batch {batch.index}: an input has shape {tuple(x.shape)} but the targets have {n} "
                f"samples (shape {tuple(t.shape)}); every input tensor must have the samples along "
                "dimension 0"
            )
    return n


def _refuse_coupling(objective: Objective) -> None:
    """Batch norm in train mode couples the samples of a batch: no per-sample terms exist."""
    for name, m in objective.model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            raise InputError(
                f"module {name or type(m).__name__} is batch norm in train mode: each sample's loss "
                "depends on the whole batch, so the cost is no sum of per-sample terms. Call "
                "model.eval() (running statistics) before computing influence"
            )


def _chunk_gradients(objective: Objective, theta: torch.Tensor, batch: Batch, lo: int, hi: int):
    """``(∇ℓ_i (c, P), ℓ_i (c,), outputs (c, 1, ...))`` for samples ``lo:hi`` of ``batch`` (vmap of grad)."""
    leaves, spec = tree_flatten(batch.inputs)
    dims = tuple(0 if isinstance(x, torch.Tensor) else None for x in leaves)
    sliced = tuple(x[lo:hi] if isinstance(x, torch.Tensor) else x for x in leaves)

    def one(th, xs, y):
        xs = [x.unsqueeze(0) if isinstance(x, torch.Tensor) else x for x in xs]
        sample = Batch(batch.index, tree_unflatten(xs, spec), y.unsqueeze(0))
        loss, out = objective.batch_loss(objective.params_dict(th), sample)
        return loss, (loss, out)

    try:
        g, (loss, out) = vmap(grad(one, has_aux=True), in_dims=(None, dims, 0))(theta, sliced, batch.targets[lo:hi])
    except (RuntimeError, ValueError) as exc:
        raise InputError(
            f"batch {batch.index}: per-sample gradients (torch.func vmap of grad over samples "
            f"{lo}..{hi - 1}) failed: {exc}. The model must treat samples independently and be "
            "usable with torch.func (no in-place ops on inputs, no data-dependent Python control flow)"
        ) from None
    return g, loss.detach(), out.detach()


def _term_counts(objective: Objective, batch: Batch, out: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``c_i``: each sample's number of loss terms (1 unless the loss is mean-reduced over terms)."""
    red = objective.reduction
    c = torch.ones(hi - lo, dtype=torch.float64)
    if red in (None, "sum", "batchmean"):
        return c
    for j in range(hi - lo):
        c[j] = term_count(objective.loss_fn, red, out[j], batch.targets[lo + j : lo + j + 1])
    return c


def per_sample_gradients(objective: Objective, *, chunk_size: Optional[int] = None, progress: Optional[bool] = None):
    """Yield ``(first index, ∇ℓ_i (c, P), ℓ_i (c,), c_i (c,))`` chunk by chunk, in data order.

    ``ℓ_i`` is ``loss_fn`` on sample ``i`` alone, at ``objective.theta0``; chunks hold at most
    ``chunk_size`` samples (default ``column_chunk(P)``: a ``(c, P)`` block under 2**24 entries)
    and never cross a batch. A sample with no loss terms (every target ignored) gets a
    zero gradient and loss, and ``c_i = 0``.
    """
    _refuse_coupling(objective)
    P = objective.size
    c = column_chunk(P) if chunk_size is None else as_int("chunk_size", chunk_size, minimum=1)
    data, theta, start = objective.data, objective.theta0.detach(), 0
    unit = "sample" if data.in_memory else "batch"
    total = sum(b.targets.shape[0] for b in data) if data.in_memory else (data.num_batches or 0)
    with Progress(total, "influence: per-sample gradients", unit=unit, enabled=progress) as bar:
        for batch in data:
            n = _check_sample_dims(batch)
            for lo in range(0, n, c):
                hi = min(n, lo + c)
                g, loss, out = _chunk_gradients(objective, theta, batch, lo, hi)
                counts = _term_counts(objective, batch, out, lo, hi)
                empty = (counts == 0).to(g.device)  # no loss terms: 0/0 loss, weight 0
                g, loss = g.masked_fill(empty[:, None], 0), loss.masked_fill(empty, 0)
                if not (all_finite(g) and all_finite(loss)):
                    bad = (~torch.isfinite(g).all(1) | ~torch.isfinite(loss)).nonzero()[0, 0]
                    raise NonFiniteError(
                        f"sample {start + int(bad)} (batch {batch.index}) has a NaN or "
                        "Inf loss or gradient; check its data and the loss"
                    )
                yield start, g, loss, counts
                start += hi - lo
                bar.update(hi - lo if unit == "sample" else 0)
            if unit == "batch":
                bar.update(1)


# -- the solve ------------------------------------------------------------------------------
def _indefinite(bound: Optional[float], damping: float, exact: bool) -> str:
    """The message for an ``H + λI`` that is not positive definite; ``bound`` ≥ λ_min(H) when known."""
    what, fix = "gᵀ(H + λI)⁻¹g ≤ 0", "a larger damping (try 10×; method='dense' gives λ_min)"
    if bound is not None:
        need = max(-bound, 0.0)
        what = f"λ_min(H) {'=' if exact else '≤'} {bound:.3e}"
        fix = f"damping > {need:.3g} (e.g. damping={max(2 * need, 1e-12):.2g})"
    return (
        f"H + λI is not positive definite ({what}, damping λ = {damping:g}): θ is not a minimum of the "
        f"training cost, and the influence function assumes one. Train to convergence, or pass {fix}; "
        "the scores then describe the damped problem (see damping_sensitivity). method='minres' solves "
        "the indefinite system anyway (with a warning)"
    )


def _dense(op: HessianOperator, g: torch.Tensor, damping: float, progress) -> Dict[str, Any]:
    """``s`` and ``t`` from the eigen-decomposition of the dense ``H`` (P products); exact extreme eigenvalues."""
    H = op.to_dense(progress=progress).double()
    H = (H + H.T) / 2
    e, V = torch.linalg.eigh(H)
    lmin, lmax = float(e[0]), float(e[-1])
    if lmin + damping <= H.shape[0] * torch.finfo(op.dtype).eps * max(abs(lmax), abs(lmin), 1e-300):
        raise InputError(_indefinite(lmin, damping, exact=True))
    gd = g.double()
    s = V @ ((V.T @ gd) / (e + damping))
    t = V @ ((V.T @ s) / (e + damping))
    residual = float((gd - H @ s - damping * s).norm() / gd.norm()) if bool(gd.any()) else 0.0
    return dict(
        s=s.to(op.dtype),
        t=t.to(op.dtype),
        method="dense",
        converged=True,
        residual=residual,
        iterations=0,
        num_matvecs=H.shape[0],
        min_eigenvalue=lmin,
        max_eigenvalue=lmax,
    )


def _curvature(op, p: torch.Tensor) -> float:
    """``pᵀHp / pᵀp`` (one product): an upper bound on λ_min(H)."""
    return float(p @ (op @ p)) / float(p @ p)


def _krylov_one(op, b, damping, method, tol, maxiter):
    res = _solve(op, b, damping=damping, method=method, tol=tol, maxiter=maxiter, x0=None, callback=None)
    if res.status == "negative_curvature":
        raise InputError(_indefinite(_curvature(op, res.curvature_direction), damping, exact=False))
    if not res.converged:
        raise NotConvergedError(f"influence: the solve of (H + λI) x = b did not converge: {res.message}", res)
    return res


def _ritz_min(op, B: torch.Tensor, damping: float):
    """Smallest Ritz value of ``H + λI`` on span(B) (an upper bound on its λ_min), and the products used."""
    Q, R = torch.linalg.qr(B.double())
    Q = Q[:, R.diagonal().abs() > 1e-10 * R.diagonal().abs().max()]
    M = Q.T @ (op @ Q.to(op.dtype)).double() + damping * torch.eye(Q.shape[1], dtype=torch.float64, device=Q.device)
    return float(torch.linalg.eigvalsh((M + M.T) / 2)[0]), Q.shape[1]


def _krylov(op, g, damping, method, tol, maxiter) -> Dict[str, Any]:
    """``s = (H + λI)⁻¹ g`` and ``t = (H + λI)⁻¹ s`` by CG or MINRES; positive definiteness checked.

    CG stops at non-positive curvature (an error here). Both methods then check the
    Rayleigh–Ritz values of ``H + λI`` on span{g, s, t} (≤ 3 products): a value ≤ 0 proves
    ``H + λI`` indefinite (an error for CG, a warning for MINRES, which solves it anyway).
    MINRES also runs CG on the same system for as many iterations as MINRES took: CG's
    pivots ``pᵀ(H + λI)p`` turn non-positive once the Krylov space sees a negative
    eigenvalue (Sylvester's inertia of the Lanczos matrix), which MINRES would not report.
    """
    first = _krylov_one(op, g, damping, method, tol, maxiter)
    s, t, matvecs = first.x, torch.zeros_like(first.x), first.num_matvecs
    if bool(s.any()) and (damping > 0 or method == "minres"):
        second = _krylov_one(op, s, damping, method, tol, maxiter)
        t, matvecs = second.x, matvecs + second.num_matvecs
    bound, proof = None, False  # proof: H + λI is certainly not positive definite
    if method == "minres" and bool(s.any()):  # CG's pivots pᵀ(H + λI)p see the same Krylov space
        probe = _solve(
            op, g, damping=damping, method="cg", tol=tol, maxiter=first.iterations + 1, x0=None, callback=None
        )
        matvecs += probe.num_matvecs + (probe.status == "negative_curvature")
        if probe.status == "negative_curvature":
            bound, proof = _curvature(op, probe.curvature_direction), True
    if bool(s.any()) and not proof:
        ritz, n = _ritz_min(op, torch.stack([g, s, t], dim=1), damping)
        matvecs += n
        bound, proof = (ritz - damping if ritz <= 0 else None), ritz <= 0 or float(g @ s) <= 0
    if proof and method != "minres":
        raise InputError(_indefinite(bound, damping, exact=False))
    if proof:
        warnings.warn(_indefinite(bound, damping, exact=False), RuntimeWarning, stacklevel=3)
    return dict(
        s=s,
        t=t,
        method=method,
        converged=True,
        residual=first.final_residual,
        iterations=first.iterations,
        num_matvecs=matvecs,
        min_eigenvalue=None,
        max_eigenvalue=None,
    )


# -- the weights of the per-sample terms, and the check that J is their sum -----------------
def _weights(objective: Objective, counts, loss_sum, loss_abs, grad_sum, grad_abs) -> float:
    """The normaliser ``Z`` with ``J = Σ_i c_i ℓ_i / Z``, verified on J's value and gradient."""
    (J, gJ), C, red = objective.value_and_grad(), float(counts.sum()), objective.reduction
    candidates = [1.0] if red == "sum" else [C] if red is not None else [C, 1.0]
    rtol = 1e3 * torch.finfo(objective.dtype).eps
    for Z in candidates:
        if Z > 0 and abs(J - loss_sum / Z) <= rtol * (abs(J) + loss_abs / Z):
            gap = float((gJ.double() - grad_sum / Z).norm())
            if gap <= rtol * (float(gJ.double().norm()) + grad_abs / Z):
                return Z
            raise InputError(
                f"the training cost's gradient differs from the weighted sum of per-sample gradients "
                f"(gap {gap:.3e}): the samples are not independent (a layer mixing samples, a loss "
                "coupling them); influence needs J = Σ_i w_i ℓ_i"
            )
    hint = " The loss has no .reduction: pass reduction='mean' or 'sum'." if red is None else ""
    raise InputError(
        f"the training cost J = {J:.6e} is not the weighted sum of per-sample losses "
        f"(Σ c_i ℓ_i = {loss_sum:.6e} over {len(counts)} samples, Σ c_i = {C:g}): the loss does not "
        f"split into per-sample terms.{hint}"
    )


def influence(
    model: torch.nn.Module,
    loss_fn,
    train_data,
    test_data,
    *,
    test_loss_fn=None,
    params: Optional[Sequence[str]] = None,
    reduction=None,
    damping: float = 0.0,
    method: Literal["auto", "cg", "minres", "dense"] = "auto",
    tol: Optional[float] = None,
    maxiter: Optional[int] = None,
    chunk_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> InfluenceResult:
    """Influence of every training point on the test cost, ``−∇ℓ_iᵀ (H + λI)⁻¹ ∇L_test``.

    See the module docstring for the convention: ``score_i < 0`` is helpful, ``> 0`` harmful,
    and ``result.removal_effect[i] = −w_i score_i`` predicts the test loss change when sample
    i is left out of training. ``H`` is the Hessian of nethessian's training cost J (batch
    weighting included) at the model's current weights, which should be a minimum.

    Args:
        model: the trained network (its weights θ̂ should minimise J).
        loss_fn: ``(outputs, targets) -> scalar``: the training loss (see ``Objective``).
        train_data: a pair, a list of batches or a DataLoader; scores follow its order.
        test_data: the test points; ``L_test`` is their cost with ``test_loss_fn``.
        test_loss_fn: default ``loss_fn`` (then ``reduction`` applies to the test cost too).
        params: names or globs of the parameters θ (default: all that require grad).
        reduction: how batches combine when ``loss_fn`` has no ``.reduction`` (see ``Objective``).
        damping: ``λ ≥ 0``.
        method: ``"cg"`` (``H + λI`` positive definite), ``"minres"`` (indefinite allowed, with a
            warning), ``"dense"`` (eigen-decomposition of the dense H: P products, exact
            eigenvalues), ``"auto"`` (dense up to 512 parameters, else cg).
        tol: relative residual of the solve (default 1e-10 in float64, 1e-5 in float32).
        maxiter: most Krylov iterations per solve (default as ``nh.solve``).
        chunk_size: samples per vmapped per-sample-gradient call (default ``column_chunk(P)``).
        progress: ``None`` auto, ``True``/``False``.

    Raises:
        InputError: bad options or data, a cost that is not a sum of per-sample terms, or ``H + λI``
            not positive definite (naming the damping that fixes it).
        NotConvergedError: the solve did not reach ``tol``.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; valid: {', '.join(map(repr, METHODS))}")
    damping = as_float("damping", damping)
    if damping < 0:
        raise InputError(f"damping must be ≥ 0 (it is added to H's eigenvalues), got {damping}")
    if dist.world_size() > 1:
        raise InputError("influence does not support torch.distributed: run it on one process")
    op = HessianOperator(model, loss_fn, train_data, params, reduction=reduction)
    train = op.objective
    _refuse_coupling(train)  # before any solve: the cheap refusals first
    if train.data.in_memory:
        for batch in train.data:
            _check_sample_dims(batch)
    test = Objective(
        model, test_loss_fn or loss_fn, test_data, params, reduction=reduction if test_loss_fn is None else None
    )
    tol = _TOL.get(train.dtype, 1e-5) if tol is None else as_float("tol", tol, positive=True)
    test_loss, g = test.value_and_grad()
    if method == "auto":
        method = "dense" if train.size <= AUTO_DENSE_MAX else "cg"
    sol = _dense(op, g, damping, progress) if method == "dense" else _krylov(op, g, damping, method, tol, maxiter)
    return _scores(train, sol, damping, float(test_loss), chunk_size, progress)


def _scores(
    train: Objective, sol: Dict[str, Any], damping: float, test_loss: float, chunk_size, progress
) -> InfluenceResult:
    """One pass of per-sample gradients: scores ``−G s``, sensitivity ``λ G t``, and J's check."""
    S = torch.stack([sol.pop("s"), sol.pop("t")], dim=1)
    parts, counts = [], []
    loss_sum = loss_abs = grad_abs = 0.0
    grad_sum = torch.zeros(train.size, dtype=torch.float64, device=train.device)
    for _, G, loss, c in per_sample_gradients(train, chunk_size=chunk_size, progress=progress):
        parts.append((G @ S).double().cpu())
        cd = c.to(device=G.device)
        loss_sum += float((cd * loss.double()).sum())
        loss_abs += float((cd * loss.double().abs()).sum())
        grad_sum += (cd[:, None] * G.double()).sum(0)
        grad_abs += float((cd * G.double().norm(dim=1)).sum())
        counts.append(c)
    GS, counts = torch.cat(parts), torch.cat(counts)
    Z = _weights(train, counts, loss_sum, loss_abs, grad_sum, grad_abs)
    scores, dlog = -GS[:, 0], damping * GS[:, 1]
    sens = float(dlog.norm()) / float(scores.norm()) if bool(scores.any()) else 0.0
    return InfluenceResult(
        scores=scores.to(train.dtype),
        weights=(counts / Z).to(train.dtype),
        damping=damping,
        damping_sensitivity=sens,
        test_loss=test_loss,
        **sol,
    )
