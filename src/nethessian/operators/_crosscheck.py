"""Cross-check of a Jacobian-vector product against an independent route.

Double backward gets ``J v = ∂(Jᵀu)ᵀv/∂u`` from the graph of ``Jᵀu``; an op whose
backward is ``@once_differentiable`` cuts that graph *without an error*, so the product
silently drops the op's contribution. Before such a route is trusted, one ``J v`` on
the first batch is compared with forward mode (exact where it runs) or, where forward
mode is missing, with central differences of the model's outputs along ``v``:

    D(h) = (f(θ + h v) − f(θ − h v)) / 2h = J v + O(h²) + O(u ‖f‖ / h),

with u the unit roundoff of the dtype and ``h = u^(1/3) max(1, ‖θ‖∞)`` (``‖v‖∞ = 1``),
which balances the two errors. Richardson's ``R = (4 D(h/2) − D(h)) / 3`` is the
reference, and ``|D(h) − D(h/2)|`` (about the truncation error of ``D(h)``) plus the
rounding term bound its error.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ._engine import EngineRejected, describe, is_ad_gap

__all__ = ["central_difference", "verify_first_batch", "verify_jv"]

JV = Callable[[torch.Tensor], torch.Tensor]  # direction (P,) -> J v with the outputs' shape


def central_difference(
    f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, v: torch.Tensor
) -> Tuple[torch.Tensor, float]:
    """Richardson-extrapolated central difference of ``f`` along ``v`` and a bound on its error."""
    u = torch.finfo(theta.dtype).eps
    h = u ** (1 / 3) * max(1.0, float(theta.abs().max())) / max(float(v.abs().max()), 1e-300)

    def D(step):
        with torch.no_grad():
            return (f(theta + step * v) - f(theta - step * v)) / (2 * step)

    d1, d2 = D(h), D(h / 2)
    f0 = f(theta).detach()
    rounding = u * float(f0.abs().max()) / (h / 2) * f0.numel() ** 0.5
    return (4 * d2 - d1) / 3, float((d1 - d2).norm()) + rounding


def verify_jv(
    jv: JV,
    f: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    exact: Optional[JV] = None,
    *,
    what: str = "double backward",
    seed: int = 0,
) -> None:
    """Raise ``EngineRejected`` when ``jv`` disagrees with forward mode or finite differences.

    Args:
        jv: the route under test, ``v ↦ J v``.
        f: the model's outputs as a function of the flat parameters (one batch).
        theta: where to differentiate.
        exact: forward mode ``v ↦ J v``; where it hits an AD gap, finite differences serve.
        what: the route's name, for the message.
        seed: seed of the random direction ``v``.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(theta.numel(), generator=g, dtype=torch.float64).to(theta)
    v = v / v.abs().max()
    got = jv(v).detach()
    u = torch.finfo(theta.dtype).eps
    ref, route, err = None, "forward mode", 0.0
    if exact is not None:
        try:
            ref = exact(v).detach()
        except Exception as exc:
            if not is_ad_gap(exc):
                raise
            route = f"finite differences (forward mode: {describe(exc)})"
    if ref is None:
        ref, err = central_difference(f, theta, v)
        route = route if exact is not None else "finite differences"
    scale = max(float(ref.norm()), float(got.norm()))
    tol = 10 * err + (u**0.5 if err else 1e3 * u) * scale + torch.finfo(theta.dtype).tiny
    gap = float((got - ref).norm())
    if gap > tol:
        raise EngineRejected(
            f"{what} disagrees with {route}: J v off by {gap / max(scale, 1e-300):.1%} of its norm "
            "(an op whose backward is @once_differentiable cuts the double-backward graph silently, "
            "or the model recomputes activations during backward with its own weights, as activation "
            "checkpointing does, so nethessian's parameter values never reach the recomputation)"
        )


def verify_first_batch(obj, per_batch, exact_per_batch, what: str) -> None:
    """``verify_jv`` of a per-batch product ``per_batch(batch, V) -> (H_b V, count)`` on the first batch.

    For streamed data (one pass over it would cost as much as the run): the batch's own gradient
    and the exact per-batch route (``exact_per_batch``) stand in for the data set's.
    """
    batch = obj.data.first()

    def grad_at(theta):
        leaf, named = obj.leaf(theta)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(obj.batch_loss(named, batch)[0], leaf, allow_unused=True)
        return torch.zeros_like(leaf) if g is None else g.detach()

    def at_v(fn):
        return lambda v: fn(batch, v[:, None])[0][:, 0]

    verify_jv(at_v(per_batch), grad_at, obj.theta0, exact=at_v(exact_per_batch), what=what)
