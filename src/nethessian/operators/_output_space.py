"""Output-space matrices of the Jacobian sandwich ``J_bᵀ M_b J_b`` (``M_b`` acts on the model's outputs).

The loss's scale (``loss_scale``), the predictive distribution it is the negative
log-likelihood of (``likelihood_of``), the exact Fisher of that distribution in output
space (``exact_output_fisher``; equal to the loss Hessian for the losses it covers), the
loss Hessian of any loss by double backward on the outputs (``autograd_loss_hessian``)
with its cross-check against differences of the gradient (``verify_loss_hessian``), and
the batched backward both reverse-mode products use (``_batched_grad``). Used by
``GGNOperator`` (``_ggn.py``) and the Fisher operators (``_fisher.py``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .._data import term_count
from ..errors import InputError
from ._crosscheck import central_difference

__all__ = [
    "OutputOp",
    "loss_scale",
    "likelihood_of",
    "class_dim",
    "term_mask",
    "exact_output_fisher",
    "autograd_loss_hessian",
    "verify_loss_hessian",
]

OutputOp = Callable[[torch.Tensor], torch.Tensor]  # (k, *out) -> (k, *out)


def loss_scale(objective, out: torch.Tensor, targets: torch.Tensor) -> Optional[float]:
    """``s`` with ``L_b = s Σ_n ℓ_n`` for the batch loss as ``loss_fn`` returns it.

    ``1`` for a sum, ``1 / c_b`` for a mean (``c_b`` the term count the mean divides by,
    ``0.0`` when every term is ignored), ``None`` when the reduction cannot be known.
    """
    red = getattr(objective.loss_fn, "reduction", None)
    red = objective.reduction if red is None else red
    if red is None:
        return None
    if red == "sum":
        return 1.0
    c = term_count(objective.loss_fn, red, out, targets)
    return 0.0 if c == 0 else 1.0 / c


def likelihood_of(loss_fn) -> Optional[str]:
    """The predictive distribution a loss is the negative log-likelihood of (up to scale), or None.

    ``"categorical"`` for ``CrossEntropyLoss`` (softmax of the outputs), ``"gaussian"``
    for ``MSELoss`` (mean f, variance ½, so that ``(f − y)²`` is the NLL up to a constant),
    ``"bernoulli"`` for ``BCEWithLogitsLoss`` (sigmoid of the outputs). Class or element
    weights change the likelihood, so weighted losses give None.
    """
    kind = type(loss_fn)
    if kind is nn.CrossEntropyLoss and loss_fn.weight is None:
        return "categorical"
    if kind is nn.MSELoss:
        return "gaussian"
    if kind is nn.BCEWithLogitsLoss and loss_fn.weight is None and loss_fn.pos_weight is None:
        return "bernoulli"
    return None


def class_dim(out: torch.Tensor) -> int:
    return 1 if out.ndim > 1 else 0


def term_mask(loss_fn, out: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
    """For class-index targets, 1 where a term counts and 0 where ``ignore_index``; shaped to broadcast."""
    if targets.is_floating_point():
        return None
    return (targets != loss_fn.ignore_index).to(out.dtype).unsqueeze(class_dim(out))


def exact_output_fisher(kind: str, loss_fn, out: torch.Tensor, targets: torch.Tensor, s: float) -> OutputOp:
    """``U ↦ s F(f) U`` per term: the Fisher of the predictive distribution in output space.

    categorical: ``diag(p) − ppᵀ`` over the class dimension (zero for ignored targets);
    gaussian: ``2 I``; bernoulli: ``σ(f)(1 − σ(f))``. For these losses (without weights)
    this *is* the loss Hessian ∇²_f L_b, so the exact Fisher equals the GGN (Martens 2020). For
    ``MSELoss`` that Hessian is ``2 s I`` (``s = 1/numel`` for a mean): a Gaussian of variance ½.
    """
    if kind == "gaussian":
        return lambda U: (2.0 * s) * U
    if kind == "bernoulli":
        sig = torch.sigmoid(out)
        d = s * sig * (1 - sig)
        return lambda U: d * U
    cd = class_dim(out)
    p = torch.softmax(out, dim=cd)
    mask = term_mask(loss_fn, out, targets)
    w = s if mask is None else s * mask

    def apply(U):
        pU = p * U
        return w * (pU - p * pU.sum(dim=cd + 1, keepdim=True))

    return apply


def _batched_grad(outputs, inputs, grads, like):
    """``[∂⟨outputs, g_i⟩/∂inputs for g_i in grads]`` stacked, graph kept; zeros where unused.

    One row: a plain backward; more: one vectorised backward (``is_grads_batched``). An op
    without a batching rule raises here, and the engine policy then loops over columns.
    """
    if grads.shape[0] == 1:
        (res,) = torch.autograd.grad(outputs, inputs, grads[0], retain_graph=True, allow_unused=True)
        res = None if res is None else res[None]
    else:
        (res,) = torch.autograd.grad(
            outputs, inputs, grads, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    if res is None:
        return torch.zeros((grads.shape[0], *like.shape), dtype=like.dtype, device=like.device)
    return res


def autograd_loss_hessian(loss_fn, out: torch.Tensor, targets: torch.Tensor) -> OutputOp:
    """``U ↦ ∇²_f L(f, y) U`` for any loss, by double backward on the outputs.

    Reverse-over-reverse avoids forward-mode gaps in loss functions (``jvp`` of the
    gradient of ``mse_loss(reduction="mean")`` raises "ZeroTensors are immutable").
    """
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(o, targets), o, create_graph=True)
    if not g.requires_grad:  # the loss is at most linear in the outputs
        return torch.zeros_like

    def apply(U):
        with torch.enable_grad():
            return _batched_grad(g, o, U, o).detach()

    return apply


def verify_loss_hessian(loss_fn, out: torch.Tensor, targets: torch.Tensor, M: OutputOp) -> None:
    """Refuse a loss whose autograd second derivative disagrees with differences of its gradient.

    A loss built from an ``autograd.Function`` whose backward is ``@once_differentiable``
    (or detaches its input) has a gradient without a graph: double backward then says
    "the loss is linear" and the GGN would silently be zero. One output-space product
    ``∇²_f L u`` is compared with Richardson central differences of ``∇_f L`` along ``u``.
    """
    f0 = out.detach()
    u = torch.randn(f0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(f0)
    u = u / u.abs().max()
    got = M(u[None])[0].detach()

    def grad_f(f):
        f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            (gr,) = torch.autograd.grad(loss_fn(f, targets), f, allow_unused=True)
        return torch.zeros_like(f) if gr is None else gr.detach()

    ref, err = central_difference(grad_f, f0, u)
    scale = max(float(ref.norm()), float(got.norm()))
    tol = 10 * err + torch.finfo(f0.dtype).eps ** 0.5 * scale + torch.finfo(f0.dtype).tiny
    gap = float((got - ref).norm())
    if gap > tol:
        raise InputError(
            f"the loss's second derivative from autograd disagrees with differences of its gradient "
            f"(off by {gap / max(scale, 1e-300):.0%}): its backward is probably @once_differentiable or "
            "detaches its input, so the GGN would be wrong. Give the loss a twice-differentiable backward, "
            "or use nh.HessianOperator(..., method='finite-difference')"
        )
