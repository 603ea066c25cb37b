"""One step's transposed Jacobian on many cotangents at once, and its curvature pieces.

``_factors`` undoes a chain of steps ``z = f(x)`` on per-sample factor matrices
``C: (n, K, D_z) ↦ Jₓᵀ C: (n, K, D_x)``. Closed forms where the Jacobian is known:

* element-wise maps (and BatchNorm in eval): J = diag(σ'(x)), so ``Jᵀ C = C ⊙ σ'``;
  the curvature residual needs ``σ''``. For tanh, sigmoid and (leaky) ReLU both come
  from the forward pass's output y without another pass (tanh: σ' = 1 − y²,
  σ'' = −2yσ'; sigmoid: σ' = y(1 − y), σ'' = σ'(1 − 2y); ReLU: σ' = [y > 0], σ'' = 0 —
  the subgradient autograd uses at 0); any other map runs one double-backward pass;
* ``nn.Linear``: ``C W``; its squared-weight pull ``(J ⊙ J)ᵀ d = d (W ⊙ W)``;
* convolutions and max-pools: ``_unfold.transpose_many`` (the pooling indices are
  computed once per step and chunk);
* anything else: the step's own VJP on each sample's input repeated K times.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, vjp

from ._unfold import Scattered, dense, pool_indices, transpose_many

__all__ = ["Transpose", "squared_input_pull", "curved"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

FLAT = (nn.ReLU, nn.LeakyReLU)  # piecewise linear: no residual term


def _act_name(step) -> str:
    """``"tanh"``, ``"sigmoid"``, ``"relu"``, ``"leaky_relu"`` or ``""`` (no closed form used)."""
    names = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu"}
    if step.module is not None:
        return names.get(type(step.module), "")
    label = step.label.split(" ")[0]
    return label if label in ("tanh", "sigmoid", "relu") else ""


def curved(step) -> bool:
    """Whether an element-wise step has a non-zero second derivative (a residual diagonal)."""
    return (
        step.kind == "elementwise"
        and not isinstance(step.module, FLAT)
        and step.label.split(" ")[0] not in ("relu", "leaky_relu")
    )


def _closed_form(step, x: torch.Tensor, y: Optional[torch.Tensor]):
    """``(σ', σ'')`` from the forward output for tanh/sigmoid/(leaky) ReLU, else None."""
    name = _act_name(step)
    if not name or (y is None and name in ("tanh", "sigmoid")):
        return None
    n = x.shape[0]
    if name == "tanh":
        s1 = 1 - y * y
        return s1.reshape(n, -1), (-2 * y * s1).reshape(n, -1)
    if name == "sigmoid":
        s1 = y * (1 - y)
        return s1.reshape(n, -1), (s1 * (1 - 2 * y)).reshape(n, -1)
    slope = step.module.negative_slope if name == "leaky_relu" else 0.0
    s1 = (x > 0).to(x.dtype)
    if slope:
        s1 = s1 + (1 - s1) * slope
    return s1.reshape(n, -1), None


def diagonal_derivatives(step, x: torch.Tensor, state, y: Optional[torch.Tensor] = None):
    """``σ'(x)`` and (curved maps) ``σ''(x)``, flattened per sample, for a diagonal Jacobian.

    Closed forms from the output ``y`` where known; otherwise ``σ'`` is the VJP of ones
    (J diagonal) and ``σ''`` the derivative of ``Σ_i σ'_i`` (``∂σ'_i/∂x_j = 0``, i ≠ j).
    """
    known = _closed_form(step, x, y)
    if known is not None:
        return known
    n, bent = x.shape[0], curved(step)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = step.fn([xg], state)
        (s1,) = torch.autograd.grad(out, xg, torch.ones_like(out), create_graph=bent)
        s2 = None
        if bent and s1.requires_grad:
            (s2,) = torch.autograd.grad(s1.sum(), xg, allow_unused=True)
    return s1.detach().reshape(n, -1), (None if s2 is None else s2.reshape(n, -1))


def _local(step, state):
    return {k: state[step.prefix + k] for k, _ in step.module.named_parameters()}


def squared_input_pull(step, x: torch.Tensor, state, d: torch.Tensor) -> torch.Tensor:
    """``(J ⊙ J)ᵀ d`` for Linear/Conv/ConvTranspose: the input VJP with squared weights, no bias."""
    if isinstance(step.module, nn.Linear):
        W2 = state[step.prefix + "weight"].square()
        return (d.reshape(*x.shape[:-1], W2.shape[0]) @ W2).reshape(x.shape[0], -1)
    local = {k: (v.square() if k == "weight" else torch.zeros_like(v)) for k, v in _local(step, state).items()}
    out, pull = vjp(lambda x_: functional_call(step.module, local, (x_,)), x)
    return pull(d.reshape(out.shape))[0].reshape(x.shape[0], -1)


def _is_identity(step, x: torch.Tensor) -> bool:
    """Whether the step only reshapes each sample (Flatten after dim 0, Unflatten, Identity, eval Dropout)."""
    m = step.module
    if isinstance(m, nn.Flatten):
        return m.start_dim % x.ndim != 0
    if isinstance(m, nn.Unflatten):
        return m.dim % x.ndim != 0
    return isinstance(m, nn.Identity) or (isinstance(m, _DROPOUT) and not m.training)


class Transpose:
    """``C ↦ Jₓᵀ C`` for one step on a chunk, ``(n, K, D_y) -> (n, K, D_x)``, and its curvature.

    Args:
        step: the step (``_graph.Step``).
        x: its input on the chunk.
        state: name → tensor of parameters and buffers.
        cls: ``_factors.jacobian_class(step)``.
        y: its output on the chunk (from the forward pass), for closed-form derivatives.
    """

    def __init__(self, step, x: torch.Tensor, state, cls: str, y: Optional[torch.Tensor] = None):
        self.step, self.x, self.state, self.cls = step, x, state, cls
        self.n, self.width = x.shape[0], x[0].numel()
        self.s1 = self.s2 = self.W = None
        self.pool: Optional[torch.Tensor] = None
        self.identity = _is_identity(step, x)
        if cls == "diagonal":
            self.s1, self.s2 = diagonal_derivatives(step, x, state, y)
        elif isinstance(step.module, nn.Linear):
            self.W = state[step.prefix + "weight"]
        elif not self.identity:
            self.pool = pool_indices(step, x)

    def factors(self, V):
        """``Jₓᵀ V`` for factors: kept ``Scattered`` below a max-pool and through diagonal steps."""
        if isinstance(V, Scattered) and self.s1 is not None:
            return V.scaled(self.s1)
        V = dense(V)
        if self.pool is None or V.shape[1] == 0:
            return self(V)
        return Scattered(V.reshape(self.n, V.shape[1], self.x.shape[1], -1), self.pool, self.x[0, 0].numel())

    def __call__(self, C: torch.Tensor) -> torch.Tensor:
        n, K = C.shape[0], C.shape[1]
        if K == 0:
            return C.new_zeros(n, 0, self.width)
        if self.identity:
            return C.reshape(n, K, self.width)
        if self.s1 is not None:
            return C * self.s1[:, None, :]
        if self.W is not None:
            return (C.reshape(n, K, -1, self.W.shape[0]) @ self.W).reshape(n, K, -1)
        fast = transpose_many(self.step, self.x, self.state, C, self.pool)
        if fast is not None:
            return fast
        xr = self.x.repeat_interleave(K, dim=0)
        out, back = vjp(lambda x_: self.step.fn([x_], self.state), xr)
        return back(C.reshape(out.shape))[0].reshape(n, K, -1)
