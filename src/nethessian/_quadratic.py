"""QuadraticModel: the second-order Taylor model of the cost, and Newton steps from it.

Near the parameters θ the cost is approximated by

    J(θ + d) ≈ q(d) = J + gᵀd + ½ dᵀH d,        g = ∇J(θ),  H = ∇²J(θ),

whose error is O(‖d‖³) for a cost with a Lipschitz Hessian: along a fixed
direction, ``J(θ + αd) − q(αd)`` shrinks like α³ (``compare`` measures that
slope). The damped Newton step minimises ``q(d) + ½λ‖d‖²``: it solves
``(H + λI) d = −g`` matrix-free (``linalg.solve``). The damped Newton *loop* lives
in ``_newton.py``; the maths is in ``docs/quadratic-and-newton.md``.

The model is built once at the current θ (a snapshot: later changes to the
model's weights do not affect it) and never changes the caller's model;
``QuadraticModel.at(θ')`` is the model at other parameters on the same
objective (no copy of the network, no re-validation). Its result types,
``QuadraticComparison`` and ``NewtonStep``, live in ``_quadratic_results.py``.
"""

from __future__ import annotations

import math
import pathlib
from typing import Literal, Mapping, Optional, Sequence, Tuple, Union

import torch

from ._checks import all_finite, as_float, as_int, as_seed
from .errors import InputError, NonFiniteError, NotConvergedError
from .linalg._solve import _solve
from .operators._hessian import HessianOperator
from ._quadratic_results import NewtonStep, QuadraticComparison

__all__ = ["QuadraticModel", "QuadraticComparison", "NewtonStep", "DIRECTIONS", "symmetric_grid"]

Direction = Union[str, torch.Tensor, Mapping[str, torch.Tensor]]
#: the named directions ``compare`` and ``plot`` understand (each a unit vector)
DIRECTIONS = ("top-eigenvector", "gradient", "random")


class QuadraticModel:
    """``q(d) = J + gᵀd + ½ dᵀHd``: the Taylor model of J at the parameters' current values.

    Args:
        model, loss_fn, data, params: the problem (see :class:`~nethessian.Objective`).
        reduction, allow_random: see :class:`~nethessian.Objective`.

    Attributes:
        value: ``J`` at θ (float). gradient: ``g`` flat ``(P,)``. operator: the
        :class:`~nethessian.HessianOperator` at θ (built once, reused). theta: θ flat.
        layout: the parameters' :class:`~nethessian.ParamLayout`. objective: the cost J(·).

    Linear least squares is exactly quadratic, so the model is exact and one undamped
    Newton step lands on the least-squares solution:

    >>> import torch
    >>> X = torch.randn(30, 3, dtype=torch.float64); y = torch.randn(30, 1, dtype=torch.float64)
    >>> lin = torch.nn.Linear(3, 1, bias=False).double()
    >>> q = QuadraticModel(lin, torch.nn.MSELoss(), (X, y))
    >>> d = torch.randn(3, dtype=torch.float64)
    >>> abs(q(d) - q.cost(d)) < 1e-12              # q(d) == J(θ + d)
    True
    >>> step = q.newton_step()
    >>> w = torch.linalg.lstsq(X, y).solution[:, 0]
    >>> torch.allclose(q.theta + step.step, w)
    True
    """

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params: Optional[Sequence[str]] = None,
        *,
        reduction=None,
        allow_random: bool = False,
    ):
        self._set_operator(
            HessianOperator(model, loss_fn, data, params, reduction=reduction, allow_random=allow_random)
        )

    @classmethod
    def from_operator(cls, operator: HessianOperator) -> "QuadraticModel":
        """The Taylor model at the operator's parameters, sharing its objective (nothing rebuilt).

        Args:
            operator: a :class:`~nethessian.HessianOperator`; its snapshot θ is the centre.

        Raises:
            InputError: for another kind of operator (the model needs the exact Hessian).
        """
        if not isinstance(operator, HessianOperator):
            raise InputError(
                f"QuadraticModel.from_operator needs a HessianOperator, got "
                f"{type(operator).__name__}: the Taylor model uses the exact Hessian"
            )
        new = object.__new__(cls)
        new._set_operator(operator)
        return new

    def _set_operator(self, operator: HessianOperator) -> None:
        self.operator = operator
        self.objective = operator.objective
        self.layout = operator.layout
        self.theta = self.objective.theta0
        self.value, self.gradient = self.objective.value_and_grad(self.theta)
        if not (math.isfinite(self.value) and all_finite(self.gradient)):
            raise NonFiniteError(f"J = {self.value} or its gradient is not finite at these parameters")

    def at(self, theta: torch.Tensor) -> "QuadraticModel":
        """The Taylor model at other parameters ``theta`` (flat ``(P,)``), on the same objective.

        Nothing is re-validated and no model is copied: the operator moves with
        ``HessianOperator.at`` (the objective with ``Objective.at``); J and g are
        evaluated at ``theta``.
        """
        new = object.__new__(type(self))
        new._set_operator(self.operator.at(self.flat(theta, "theta")))
        return new

    @property
    def size(self) -> int:
        return self.layout.size

    @property
    def gradient_norm(self) -> float:
        return float(self.gradient.double().norm())

    def __repr__(self) -> str:
        return f"QuadraticModel(P={self.size}, J={self.value:.6g}, ‖g‖={self.gradient_norm:.3e})"

    # -- evaluation ---------------------------------------------------------------------
    def flat(self, d: Union[torch.Tensor, Mapping[str, torch.Tensor]], name: str = "d") -> torch.Tensor:
        """``d`` as a finite flat ``(P,)`` tensor in the model's dtype and device.

        A dict is keyed by parameter name (natural shapes); names left out are zero.
        """
        if isinstance(d, Mapping):
            if not d:
                raise InputError(f"{name} is an empty dict; give tensors for some of: {', '.join(self.layout.names)}")
            d = self.layout.flatten({k: torch.as_tensor(v) for k, v in d.items()}, strict=False)
        d = torch.as_tensor(d)
        if d.ndim != 1 or d.shape[0] != self.size:
            raise InputError(
                f"{name} must be a flat vector of shape ({self.size},) (P = {self.size}: "
                f"{', '.join(f'{n} {tuple(s)}' for n, s in zip(self.layout.names, self.layout.shapes))}) "
                f"or a dict keyed by those names; got shape {tuple(d.shape)}"
            )
        if not d.is_floating_point():
            d = d.double()
        bad = int((~torch.isfinite(d)).sum())
        if bad:
            raise NonFiniteError(f"{name} has {bad} non-finite (NaN or Inf) entries out of {self.size}")
        return d.to(device=self.gradient.device, dtype=self.gradient.dtype)

    def change(self, d) -> float:
        """``q(d) − J = gᵀd + ½ dᵀHd``, without the cancellation of ``q(d) − J``."""
        d = self.flat(d)
        Hd = self.operator @ d
        return float(torch.dot(self.gradient.double(), d.double()) + 0.5 * torch.dot(d.double(), Hd.double()))

    def __call__(self, d) -> float:
        """``q(d) = J + gᵀd + ½ dᵀHd`` for a flat ``(P,)`` or name-keyed ``d``."""
        return self.value + self.change(d)

    def cost(self, d) -> float:
        """The true cost ``J(θ + d)`` (one pass over the data)."""
        return self.objective.value(self.theta + self.flat(d))

    # -- directions ---------------------------------------------------------------------
    def direction(self, name: str, *, seed: int = 0) -> torch.Tensor:
        """A unit direction by name.

        ``"top-eigenvector"`` (largest eigenvalue of H, by Lanczos), ``"gradient"``
        (steepest descent ``−g/‖g‖``) or ``"random"`` (seeded normal).
        """
        if name == "gradient":
            gn = self.gradient_norm
            if gn == 0:
                raise InputError("the gradient is zero here: the 'gradient' direction is undefined")
            return -self.gradient / gn
        seed = as_seed(seed) or 0
        if name == "random":
            gen = torch.Generator().manual_seed(seed)
            u = torch.randn(self.size, generator=gen, dtype=torch.float64)
            return (u / u.norm()).to(self.gradient)
        if name == "top-eigenvector":
            if self.size == 1:
                return torch.ones_like(self.gradient)
            from .linalg._lanczos import eigenvalues

            return eigenvalues(self.operator, k=1, which="largest", tol=1e-8, seed=seed).eigenvectors[:, 0]
        raise InputError(f"unknown direction {name!r}; valid: {', '.join(DIRECTIONS)}, or a vector")

    def _resolve(self, direction: Direction, seed: int) -> Tuple[torch.Tensor, str]:
        if isinstance(direction, str):
            return self.direction(direction, seed=seed), direction
        return self.flat(direction, "direction"), "given"

    def compare(self, direction: Direction = "random", alphas=None, *, seed: int = 0) -> QuadraticComparison:
        """``J(θ + αd)`` against ``q(αd)`` for each α.

        Args:
            direction: flat ``(P,)`` or name-keyed ``d`` (used as given), or one of
                :data:`DIRECTIONS` (a unit vector).
            alphas: step sizes (default ``logspace(-4, 0, 9)``).
            seed: for ``"random"`` and the Lanczos start of ``"top-eigenvector"``.
        """
        d, label = self._resolve(direction, seed)
        alphas = (
            torch.logspace(-4, 0, 9, dtype=torch.float64)
            if alphas is None
            else torch.as_tensor(alphas, dtype=torch.float64).reshape(-1).cpu()
        )
        if alphas.numel() == 0 or not torch.isfinite(alphas).all():
            raise InputError(f"alphas must be a non-empty list of finite numbers, got {alphas.tolist()}")
        gd = float(torch.dot(self.gradient.double(), d.double()))
        dHd = float(torch.dot(d.double(), (self.operator @ d).double()))
        true = torch.tensor([self.objective.value(self.theta + float(a) * d) for a in alphas], dtype=torch.float64)
        model = self.value + alphas * gd + 0.5 * alphas**2 * dHd
        diff = true - model
        eps = torch.finfo(self.objective.dtype).eps
        return QuadraticComparison(alphas, true, model, diff, _loglog_slope(alphas, diff, self.value, eps), label)

    # -- Newton -------------------------------------------------------------------------
    def _step(self, damping: float, method: str, tol: float, maxiter: Optional[int]) -> NewtonStep:
        """The step from one solve with ``method`` (no fallback, no warning)."""
        res = _solve(
            self.operator,
            -self.gradient,
            damping=damping,
            method=method,
            tol=tol,
            maxiter=maxiter,
            x0=None,
            callback=None,
        )
        pred = -self.change(res.x)
        pd = None if method == "minres" else res.status != "negative_curvature"
        return NewtonStep(
            res.x,
            pred,
            float(damping),
            self.gradient_norm,
            float(res.x.double().norm()),
            pd,
            res,
            self.layout,
            res.curvature_direction,
        )

    def newton_step(
        self,
        damping: float = 0.0,
        *,
        method: Literal["auto", "cg", "minres"] = "auto",
        tol: float = 1e-10,
        maxiter: Optional[int] = None,
    ) -> NewtonStep:
        """The damped Newton step: ``d`` solving ``(H + λI) d = −g``, ``λ = damping``.

        ``d`` minimises ``q(d) + ½λ‖d‖²`` when ``H + λI`` is positive definite. ``"auto"``
        runs CG and, if CG meets non-positive curvature, MINRES: ``d`` is then the
        stationary point of the damped model (a saddle of it, possibly uphill), and the
        step says so (``positive_definite=False``, the direction found, a negative
        ``predicted_decrease`` when it goes uphill). For a descent step on an indefinite
        ``H``, raise ``damping`` above ``−λ_min(H)``, or use :func:`nethessian._newton`.

        Raises:
            NotConvergedError: the solve did not reach ``tol`` (maxiter, a singular system,
                or non-positive curvature with ``method="cg"``); the message gives the
                residual, ``.result`` holds the :class:`NewtonStep`.
            InputError: unknown method, non-finite damping, bad ``tol``/``maxiter``.
        """
        if method not in ("auto", "cg", "minres"):
            raise InputError(f"unknown method {method!r}; valid: 'auto', 'cg', 'minres'")
        damping = as_float("damping", damping)
        tol = as_float("tol", tol, positive=True)
        maxiter = None if maxiter is None else as_int("maxiter", maxiter, minimum=1)
        step = self._step(damping, "cg" if method == "auto" else method, tol, maxiter)
        if method == "auto" and step.solve.status == "negative_curvature":
            mr = self._step(damping, "minres", tol, maxiter)
            step = NewtonStep(
                mr.step,
                mr.predicted_decrease,
                mr.damping,
                mr.gradient_norm,
                mr.step_norm,
                False,
                mr.solve,
                self.layout,
                step.negative_curvature_direction,
            )
        if not step.converged:
            raise NotConvergedError(
                f"newton_step(damping={float(damping):g}) failed ({step.solve.status}): {step.solve.message}", step
            )
        return step

    # -- figure -------------------------------------------------------------------------
    def plot(
        self, path, directions: Sequence[Direction] = DIRECTIONS, *, radius: float = 1.0, num: int = 41, seed: int = 0
    ) -> pathlib.Path:
        """Draw ``J(θ + αu)`` (true) and ``q(αu)`` (predicted), ``|α| ≤ radius``, per direction.

        Named directions are unit vectors; a given vector is used as is. The figure is
        ``nethessian._plots.quadratic_plot`` (no pyplot state touched); the image format
        comes from the suffix (e.g. ``.png``). Returns the path.
        """
        from . import _plots

        if isinstance(directions, (str, torch.Tensor, Mapping)):
            directions = (directions,)
        if not directions:
            raise InputError(f"give at least one direction: {', '.join(DIRECTIONS)}, or a vector")
        alphas = symmetric_grid(as_float("radius", radius, positive=True), as_int("num", num, minimum=2))
        seed = as_seed(seed)
        comparisons = [self.compare(d, alphas, seed=seed) for d in directions]
        return _plots.save(_plots.quadratic_plot(comparisons), path)


def _loglog_slope(alphas: torch.Tensor, diff: torch.Tensor, value: float, eps: float) -> float:
    """Least-squares slope of log|diff| on log|α| over points above the rounding floor of J."""
    floor = 1e3 * eps * max(abs(value), 1e-300)
    keep = (alphas != 0) & (diff.abs() > floor)
    if int(keep.sum()) < 2:
        return float("nan")
    x, y = alphas[keep].abs().log(), diff[keep].abs().log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def symmetric_grid(radius: float, num: int) -> torch.Tensor:
    """``num`` equally spaced α in ``[−radius, radius]``, mirrored exactly (α = 0 is exactly 0 for odd num).

    ``torch.linspace(-r, r, 41)[20]`` is −2.8e-17 on some CPUs (vectorised rounding).
    """
    half = torch.linspace(0.0, radius, num // 2 + 1, dtype=torch.float64)
    if num % 2:
        return torch.cat([-half.flip(0)[:-1], half])
    step = radius / (num - 1)
    right = torch.linspace(step, radius, num // 2, dtype=torch.float64)
    return torch.cat([-right.flip(0), right])
