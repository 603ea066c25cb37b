"""The table of rules: which graph nodes second-order backpropagation supports, and how.

Every supported node computes ``y = f(x_1, …, x_m; θ)`` *per sample* (sample n's
output depends on sample n's inputs only), so each per-sample Hessian backpropagates
on its own. The chain rule for second derivatives through one node is

    H_x = Jᵀ H_y J + Σ_k g_k ∇²_x f_k,      g_x = Jᵀ g_y,

with ``J = ∂y/∂x`` and ``g = ∂ℓ/∂y``. The kinds below say what the second,
*residual* term is; the first term is always computed with the node's own
vector-Jacobian product (``torch.func.vjp``, vmapped over the columns of H_y),
so no Jacobian is written twice.

* ``"linear"`` — f is linear (or piecewise linear) in x: Linear, Conv1d/2d/3d,
  ConvTranspose1d/2d/3d, Flatten, Identity, Dropout in eval, pooling (average:
  linear; max: a selection, linear almost everywhere), BatchNorm in eval (an
  affine map with the running statistics), additions and subtractions,
  ``x @ W``. Then ∇²_x f = 0: ``H_x = Jᵀ H_y J``.
* ``"elementwise"`` — ``y_i = σ(x_i)``: ∇²_x f_k = σ''(x_k) e_k e_kᵀ, so the residual
  is ``diag(g ⊙ σ''(x))``, read off one double-backward pass (the derivative of
  ``Σ_i ∂(gᵀσ(x))/∂x_i`` is ``g ⊙ σ''`` because the Hessian of ``gᵀσ(x)`` is
  diagonal). Tanh, Sigmoid, Softplus, ReLU, LeakyReLU, ELU, SELU, GELU, SiLU, LogSigmoid.
* ``"smooth"`` — a per-sample non-linear map with a dense residual: LayerNorm,
  LogSoftmax, Softmax. The residual ∇²_x(g_nᵀ f(x_n)) is formed per sample with
  ``torch.func.hessian`` (D_x² per sample).

Parameters: every supported node is *linear in its parameters θ* (Linear, Conv,
ConvTranspose, BatchNorm/LayerNorm affine, Embedding, ``x @ W``), so
``∇²_θ f = 0`` and the block is ``H_θθ = Σ_n J_θ,nᵀ H_y,n J_θ,n``; with the
input, ``∂²(gᵀf)/∂x∂θ`` is the bilinear cross term (Linear: ``g_j δ_ii'``).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["classify_module", "classify_function", "ELEMENTWISE_MODULES"]

LINEAR_MODULES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Embedding,
)
ELEMENTWISE_MODULES = (
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.LogSigmoid,
)
SMOOTH_MODULES = (nn.LayerNorm, nn.LogSoftmax, nn.Softmax)
EVAL_ONLY = {
    nn.Dropout: "draws random masks",
    nn.Dropout1d: "draws random masks",
    nn.Dropout2d: "draws random masks",
    nn.AlphaDropout: "draws random masks",
    nn.BatchNorm1d: "normalises with batch statistics (samples are not independent)",
    nn.BatchNorm2d: "normalises with batch statistics (samples are not independent)",
    nn.BatchNorm3d: "normalises with batch statistics (samples are not independent)",
}

_LINEAR_FUNCTIONS = {
    operator.add,
    torch.add,
    operator.sub,
    torch.sub,
    torch.flatten,
    operator.neg,
    torch.neg,
    operator.matmul,
    torch.matmul,
    F.linear,
}
_ELEMENTWISE_FUNCTIONS = {
    torch.tanh,
    torch.sigmoid,
    torch.relu,
    F.relu,
    F.softplus,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.logsigmoid,
    torch.nn.functional.tanh,
    torch.nn.functional.sigmoid,
}
_SMOOTH_FUNCTIONS = {F.log_softmax, torch.log_softmax, F.softmax, torch.softmax, F.layer_norm}
_LINEAR_METHODS = {"flatten", "add", "sub", "neg", "__add__", "__sub__"}
_ELEMENTWISE_METHODS = {"tanh", "sigmoid", "relu"}
_SMOOTH_METHODS = {"log_softmax", "softmax"}


def classify_module(module: nn.Module) -> tuple:
    """``(kind, None)`` for a supported module, ``(None, reason)`` otherwise."""
    for cls, why in EVAL_ONLY.items():
        if type(module) is cls:
            if module.training:
                return None, f"{cls.__name__} in train mode {why}; call model.eval() or use engine='autodiff'"
            return "linear", None
    if isinstance(module, LINEAR_MODULES):
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return None, "Embedding with max_norm renormalises its weight in place"
        return "linear", None
    if isinstance(module, ELEMENTWISE_MODULES):
        return "elementwise", None
    if isinstance(module, SMOOTH_MODULES):
        return "smooth", None
    return None, f"{type(module).__name__} has no second-order backpropagation rule"


def classify_function(target, is_method: bool) -> Optional[str]:
    """The kind of a ``call_function`` / ``call_method`` node's target, or None."""
    if is_method:
        for kind, names in (
            ("linear", _LINEAR_METHODS),
            ("elementwise", _ELEMENTWISE_METHODS),
            ("smooth", _SMOOTH_METHODS),
        ):
            if target in names:
                return kind
        return None
    for kind, table in (
        ("linear", _LINEAR_FUNCTIONS),
        ("elementwise", _ELEMENTWISE_FUNCTIONS),
        ("smooth", _SMOOTH_FUNCTIONS),
    ):
        if target in table:
            return kind
    return None
