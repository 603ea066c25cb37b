"""Damped Newton's method with matrix-free solves and a gradient-scaled Levenberg–Marquardt rule.

Each step solves ``(H_k + λ_k I) d = −g_k`` by CG at the current θ_k, with

    λ_k = μ_k ‖g_k‖

(regularised Newton: Li, Fukushima, Qi & Yamashita 2004; Ueda & Yamashita 2010), and
updates the factor μ from the ratio of true to predicted decrease,
``ρ = (J(θ_k) − J(θ_k + d)) / (J(θ_k) − q_k(d))``, as Levenberg–Marquardt does:

* ρ > 3/4: μ ← max(μ/3, μ_min);  ρ < 1/4: μ ← 2μ;  ρ ≤ 0: reject d, μ ← 4μ, re-solve;
* CG meets non-positive curvature of ``H + λI`` (an indefinite H): reject, raise μ so that
  λ exceeds twice the negative curvature seen (at least 4μ), re-solve.

Because λ_k shrinks with ‖g_k‖, the damping vanishes at the minimum and the
convergence is quadratic, also at a degenerate (singular-H) minimum such as the
two-layer network's exact fit; a fixed λ would leave it linear with rate about
λ/(λ + σ) in the curvature-σ directions. The maths is in ``docs/quadratic-and-newton.md``.

The caller's model is never changed: every iterate is evaluated on one
``Objective`` (a snapshot of the model) through ``QuadraticModel.at(θ)``, and
``NewtonResult.apply(model)`` writes the result back when asked to.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ._checks import as_float, as_int
from .errors import InputError, NotConvergedWarning
from .operators import HessianOperator
from ._params import ParamLayout
from ._quadratic import QuadraticModel

__all__ = ["NewtonIteration", "NewtonResult", "newton"]

_SHRINK, _GROW, _REJECT = 3.0, 2.0, 4.0  # μ ← μ/3 (ρ > 3/4), 2μ (ρ < 1/4), 4μ (rejected)


@dataclass(frozen=True)
class NewtonIteration:
    """One attempted step from θ_k (rejected attempts repeat ``iteration``)."""

    iteration: int
    value: float  # J(θ_k)
    gradient_norm: float  # ‖g_k‖
    damping: float  # λ = μ‖g_k‖
    step_norm: float  # ‖d‖ (nan when the solve was refused)
    predicted_decrease: float  # J − q(d)
    actual_decrease: float  # J(θ_k) − J(θ_k + d)
    ratio: float  # ρ; nan when the decrease is below rounding (step accepted)
    accepted: bool
    solver_status: str
    solver_iterations: int
    solver_residual: float  # true ‖(H + λI)d + g‖ / ‖g‖


@dataclass(frozen=True, eq=False)
class NewtonResult:
    """Outcome of :func:`newton`: the final θ and one :class:`NewtonIteration` per attempt."""

    theta: torch.Tensor
    value: float
    gradient_norm: float
    converged: bool
    num_steps: int
    history: Tuple[NewtonIteration, ...]
    message: str
    layout: ParamLayout

    @property
    def params(self) -> Dict[str, torch.Tensor]:
        """The final parameters by name, in their natural shapes."""
        return self.layout.unflatten(self.theta)

    @property
    def gradient_norms(self) -> torch.Tensor:
        """‖g_k‖ at every accepted iterate θ_0, θ_1, …, and at the final θ (float64)."""
        ks = [h.gradient_norm for h in self.history if h.accepted]
        return torch.tensor(ks + [self.gradient_norm], dtype=torch.float64)

    def convergence_ratios(self, order: float = 2.0) -> torch.Tensor:
        """``e_{k+1} / e_k^order`` with ``e_k = ‖g_k‖``: bounded for convergence of that order."""
        e = self.gradient_norms
        return e[1:] / e[:-1] ** order

    def apply(self, model: nn.Module) -> nn.Module:
        """Write the final θ into ``model``'s parameters, in place (explicitly asked); returns it."""
        named = dict(model.named_parameters())
        for name, value in self.params.items():
            if name not in named or tuple(named[name].shape) != tuple(value.shape):
                raise InputError(
                    f"model has no parameter {name!r} of shape {tuple(value.shape)}; "
                    f"apply() needs the model newton() was run on"
                )
        with torch.no_grad():
            for name, value in self.params.items():
                named[name].copy_(value)
        return model

    def table(self, *, rejected: bool = True) -> str:
        """The history as text: per attempt step, J, predicted and actual decrease, ρ, λ, ‖g‖, ‖d‖.

        Then the final iterate and the message. ``rejected=False`` leaves out the rejected attempts.
        """
        head = f"{'step':>4}  {'J':>10}  {'predicted':>10}  {'actual':>10}  {'ρ':>6}  {'λ':>8}  {'‖g‖':>9}  {'‖d‖':>8}"
        rows = [head]
        for h in self.history:
            if not (h.accepted or rejected):
                continue
            rho = "   —  " if math.isnan(h.ratio) else f"{h.ratio:6.3f}"
            pred = "—" if math.isnan(h.predicted_decrease) else f"{h.predicted_decrease:.3e}"
            act = "—" if math.isnan(h.actual_decrease) else f"{h.actual_decrease:.3e}"
            mark = (
                ""
                if h.accepted
                else f"  rejected ({h.solver_status})"
                if h.solver_status != "converged"
                else "  rejected"
            )
            dn = "—" if math.isnan(h.step_norm) else f"{h.step_norm:.1e}"
            rows.append(
                f"{h.iteration:>4}  {h.value:10.3e}  {pred:>10}  {act:>10}  {rho}  {h.damping:8.1e}  "
                f"{h.gradient_norm:9.2e}  {dn:>8}{mark}"
            )
        rows.append(
            f"{self.num_steps:>4}  {self.value:10.3e}  {'':>10}  {'':>10}  {'':6}  {'':8}  {self.gradient_norm:9.2e}"
        )
        rows.append(self.message)
        return "\n".join(rows)

    __str__ = table

    def to_dict(self) -> Dict[str, Any]:
        """Plain Python types only, ready for ``json.dumps``."""
        return {
            "params": {n: t.detach().cpu().double().tolist() for n, t in self.params.items()},
            "value": self.value,
            "gradient_norm": self.gradient_norm,
            "converged": self.converged,
            "num_steps": self.num_steps,
            "message": self.message,
            "history": [dict(h.__dict__) for h in self.history],
        }


def _check(max_steps, gtol, damping, min_factor, max_retries, maxiter):
    """The options as numbers (strings, bools and fractional counts refused)."""
    ints = [as_int(n, v, minimum=0) for n, v in (("max_steps", max_steps), ("max_retries", max_retries))]
    floats = [as_float(n, v) for n, v in (("gtol", gtol), ("damping", damping), ("min_factor", min_factor))]
    for name, v in zip(("gtol", "damping", "min_factor"), floats):
        if v < 0:
            raise InputError(f"{name} must be ≥ 0, got {v!r}")
    if floats[1] == 0:
        raise InputError("damping (the initial λ) must be > 0: it scales the Levenberg–Marquardt factor μ")
    maxiter = None if maxiter is None else as_int("maxiter", maxiter, minimum=1)
    return (*ints, *floats, maxiter)


def _attempt(q: QuadraticModel, k: int, lam: float, tol: float, maxiter):
    """Solve, try the step; returns (record, step or None, −pᵀHp when CG met negative curvature)."""
    step = q._step(lam, "cg", tol, maxiter)
    res, nan = step.solve, float("nan")
    if res.status == "negative_curvature" or res.final_residual >= 0.5:
        neg = None
        if step.negative_curvature_direction is not None:
            p = step.negative_curvature_direction
            neg = -float(torch.dot(p.double(), (q.operator @ p).double()))
        rec = NewtonIteration(
            k, q.value, q.gradient_norm, lam, nan, nan, nan, nan, False, res.status, res.iterations, res.final_residual
        )
        return rec, None, neg
    J_new = q.cost(step.step)
    actual, pred = q.value - J_new, step.predicted_decrease
    noise = 100 * torch.finfo(q.objective.dtype).eps * max(abs(q.value), abs(J_new) if math.isfinite(J_new) else 0)
    if not math.isfinite(J_new):
        rho, ok = nan, False
    elif pred <= noise:  # the decrease is below rounding: ρ means nothing; accept unless J rose
        rho, ok = nan, actual >= -noise
    else:
        rho = actual / pred
        ok = rho > 0
    rec = NewtonIteration(
        k,
        q.value,
        q.gradient_norm,
        lam,
        step.step_norm,
        pred,
        actual,
        rho,
        ok,
        res.status,
        res.iterations,
        res.final_residual,
    )
    return rec, (step if ok else None), None


def _start(model, loss_fn, data, params, reduction, allow_random) -> QuadraticModel:
    """The Taylor model Newton starts from: built here, or the one (or the operator) given."""
    if isinstance(model, (QuadraticModel, HessianOperator)):
        given = [
            n
            for n, v in (("loss_fn", loss_fn), ("data", data), ("params", params), ("reduction", reduction))
            if v is not None
        ] + (["allow_random"] if allow_random else [])
        if given:
            raise InputError(
                f"newton got a {type(model).__name__}, which already fixes the problem; leave out {', '.join(given)}"
            )
        return model if isinstance(model, QuadraticModel) else QuadraticModel.from_operator(model)
    if loss_fn is None or data is None:
        raise InputError("newton needs (model, loss_fn, data), or a QuadraticModel / HessianOperator")
    return QuadraticModel(model, loss_fn, data, params, reduction=reduction, allow_random=allow_random)


def newton(
    model,
    loss_fn: Optional[Callable] = None,
    data=None,
    params: Optional[Sequence[str]] = None,
    *,
    max_steps: int = 50,
    gtol: float = 1e-10,
    damping: float = 1e-3,
    min_factor: float = 1e-8,
    max_retries: int = 30,
    maxiter: Optional[int] = None,
    reduction=None,
    allow_random: bool = False,
    callback: Optional[Callable[[NewtonIteration], Any]] = None,
) -> NewtonResult:
    """Minimise J by damped Newton steps ``(H + λI) d = −g``, λ = μ‖g‖ (see the module docstring).

    Args:
        model: the network (see ``Objective``); not changed: one ``Objective`` (a snapshot) is
            built, and every iterate is evaluated on it (``QuadraticModel.at``). Or a
            ``QuadraticModel`` / ``HessianOperator`` already built for the problem: Newton
            then starts from its θ on its objective (``loss_fn``, ``data``, ``params``,
            ``reduction`` and ``allow_random`` must be left out).
        loss_fn: ``(outputs, targets) -> scalar``.
        data: an ``(inputs, targets)`` pair or a re-iterable of them.
        params: names or globs of the parameters to optimise (default: all trainable).
        reduction: how batches combine (see ``Objective``).
        allow_random: accept a random forward pass (see ``Objective``).
        max_steps: most accepted steps.
        gtol: stop when ``‖g‖ ≤ gtol`` (absolute; in float32 choose it above rounding, about
            1e-6 times the scale of g).
        damping: the initial λ₀ (> 0); μ₀ = λ₀/‖g₀‖.
        min_factor: the floor μ_min of μ.
        max_retries: most rejected attempts in a row before giving up.
        maxiter: most CG iterations per solve (default ``min(10·P, 10 000)``). CG runs to the
            relative residual ``min(0.1, ‖g‖)`` (inexact Newton with a forcing term O(‖g‖),
            which keeps the convergence quadratic); a step whose solve stopped early is still
            used when its residual is below ½ (the ratio test guards it).
        callback: called with each :class:`NewtonIteration` as it is made.

    Returns:
        :class:`NewtonResult`; ``.apply(model)`` writes the final θ into ``model``. A result
        with ``converged=False`` also emits a ``NotConvergedWarning`` carrying its ``message``.

    >>> import torch
    >>> from nethessian import examples
    >>> model, loss_fn, data = examples.two_layer(seed=0)
    >>> W1 = model.W1.detach().clone()
    >>> res = newton(model, loss_fn, data)
    >>> res.converged, res.gradient_norm < 1e-10, res.value < 1e-15
    (True, True, True)
    >>> torch.equal(model.W1, W1)                      # the caller's model is untouched ...
    True
    >>> res.apply(model) is model and torch.equal(model.W1, res.params["W1"])   # ... until asked
    True
    """
    max_steps, max_retries, gtol, damping, min_factor, maxiter = _check(
        max_steps, gtol, damping, min_factor, max_retries, maxiter
    )
    q = _start(model, loss_fn, data, params, reduction, allow_random)
    layout, history, steps = q.layout, [], 0
    mu = damping / max(q.gradient_norm, 1e-300)
    while True:
        gn = q.gradient_norm
        if gn <= gtol:
            converged, msg = True, f"converged: ‖g‖ = {gn:.3e} ≤ gtol = {gtol:g} after {steps} steps"
            break
        if steps >= max_steps:
            converged, msg = (
                False,
                (
                    f"not converged: ‖g‖ = {gn:.3e} > gtol = {gtol:g} after max_steps = "
                    f"{max_steps} steps; raise max_steps or loosen gtol"
                ),
            )
            break
        step, rec = None, None
        for _ in range(max_retries + 1):
            rec, step, neg = _attempt(q, steps, mu * gn, max(min(0.1, gn), 1e-13), maxiter)
            history.append(rec)
            if callback is not None:
                callback(rec)
            if step is not None:
                break
            mu = max(_REJECT * mu, 2 * neg / gn) if neg is not None else _REJECT * mu
        if step is None:
            converged, msg = (
                False,
                (
                    f"not converged: {max_retries + 1} attempts from step {steps} were all "
                    f"rejected (last: {rec.solver_status}, λ = {rec.damping:.3e}); the cost "
                    "may be non-smooth or non-finite here"
                ),
            )
            break
        if not math.isnan(rec.ratio):
            mu = max(mu / _SHRINK, min_factor) if rec.ratio > 0.75 else mu * _GROW if rec.ratio < 0.25 else mu
        q = q.at(q.theta + step.step)  # the same objective at the new θ: nothing rebuilt
        steps += 1
    result = NewtonResult(q.theta.clone(), q.value, q.gradient_norm, converged, steps, tuple(history), msg, layout)
    if not converged:
        warnings.warn(msg, NotConvergedWarning, stacklevel=2)
    return result
