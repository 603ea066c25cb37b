"""Per-sample, per-factor parameter gradients of convolutions by unfolding (no vmap).

A convolution is linear in its weight: with the input unfolded into patches
``X_n[c, κ, p]`` (channel c, kernel offset κ, output position p),

    y_n[o, p] = Σ_{c,κ} W[o, c, κ] X_n[g(o)·C/g + c, κ, p] + b[o],

so for a cotangent ``v`` (one factor of one sample) the weight gradient is
``G[o, c, κ] = Σ_p v[o, p] X[g(o)·C/g + c, κ, p]`` and the bias gradient
``Σ_p v[o, p]`` — one ``einsum`` for all samples and factors at once. A transposed
convolution is the adjoint of a convolution with the same kernel settings, so its
weight gradient ``G[c, o, κ] = Σ_q x[c, q] V[o, κ, q]`` unfolds the cotangent instead
(``output_padding`` only appends output positions no input reaches).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Scattered", "conv_factor_grads", "dense", "pool_indices", "transpose_many"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def unfold(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """``(B, C, *S) -> (B, C, *k, *out)``: every patch of an N-d convolution (zero padding)."""
    m = len(kernel)
    pad = []
    for p in reversed(padding):
        pad += [p, p]
    x = F.pad(x, pad)
    for i in range(m):
        span = (kernel[i] - 1) * dilation[i] + 1
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]  # window appended last
    # now (B, C, *out, *k)
    order = [0, 1] + [2 + m + i for i in range(m)] + [2 + i for i in range(m)]
    return x.permute(order)


def _supported(module: nn.Module) -> bool:
    return (
        isinstance(module, _CONV + _TRANSPOSED)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


class Scattered:
    """Factors at a max-pool's input kept as their values at the maxima (the rest is zero).

    ``dense()[n, k, c, s] = Σ_{q: idx[n, c, q] = s} vals[n, k, c, q]`` — a pool's
    transposed Jacobian scatters, so ``Jᵀ V`` is exactly this, and a diagonal Jacobian
    below it (the ReLU before a max-pool) scales the values by ``σ'`` at the maxima
    (``scaled``) instead of touching the zeros; a convolution's weight gradient
    gathers its input patches at the maxima (``conv_factor_grads``). Anything else
    materialises it.
    """

    def __init__(self, vals: torch.Tensor, idx: torch.Tensor, S: int):
        self.vals, self.idx, self.S = vals, idx, S  # (n, K, C, Q), (n, C, Q), positions per channel
        n, K, C = vals.shape[:3]
        self.shape = (n, K, C * S)
        self._dense: Optional[torch.Tensor] = None

    def dense(self) -> torch.Tensor:
        """The plain ``(n, K, C·S)`` tensor (made once: a conv's weights and its input pull both read it)."""
        if self._dense is None:
            n, K, C, Q = self.vals.shape
            out = self.vals.new_zeros(n, K, C, self.S)
            out.scatter_add_(3, self.idx[:, None].expand(n, K, C, Q), self.vals)
            self._dense = out.reshape(self.shape)
        return self._dense

    def scaled(self, s: torch.Tensor) -> "Scattered":
        """``diag(s) · dense()`` for per-sample ``s`` (n, C·S), on the values only."""
        n, C = self.idx.shape[:2]
        return Scattered(self.vals * s.reshape(n, C, self.S).gather(2, self.idx)[:, None], self.idx, self.S)


def dense(V):
    """A factor tensor as a plain ``(n, K, D)`` tensor (``Scattered`` materialised)."""
    return V.dense() if isinstance(V, Scattered) else V


def _gathered_weight_grads(module, x: torch.Tensor, V: Scattered, args) -> torch.Tensor:
    """``(n, K, g, O/g, C/g·κ)``: ``G[o, c, κ] = Σ_q vals[o, q] X[c, κ, idx[o, q]]`` (convolution)."""
    n, K, channels, Q = V.vals.shape
    g = module.groups
    per = channels // g
    Xu = unfold(x, *args).reshape(n, g, 1, -1, V.S)  # (n, g, 1, C/g·κ, P)
    ck = Xu.shape[3]
    idx = V.idx.reshape(n, g, per, 1, Q).expand(n, g, per, ck, Q)
    Xq = Xu.expand(n, g, per, ck, V.S).gather(4, idx)  # (n, g, O/g, C/g·κ, Q)
    return torch.einsum("nkgoq,ngocq->nkgoc", V.vals.reshape(n, K, g, per, Q), Xq)


def conv_factor_grads(step, x: torch.Tensor, V) -> Optional[torch.Tensor]:
    """``J_θ,nᵀ v_{n,k}`` for a (transposed) convolution: ``(n, K, P_step)``; None if not one.

    ``V`` is a tensor or a ``Scattered``; the latter is used as it is (input patches
    gathered at the maxima: ``S/Q`` times fewer products) when the gathered patches,
    ``O·C/g·κ·Q`` per sample, fit the ``2K(P + D_y)`` that ``_factors.factor_bytes``
    allots to a layer's per-factor gradients.
    """
    module = step.module
    if not _supported(module):
        return None
    n, K = x.shape[0], V.shape[1]
    y_shape = (module.out_channels, *_shape(module, x))
    if _prod(y_shape) != V.shape[2]:
        return None
    args = (module.kernel_size, module.stride, module.padding, module.dilation)
    P_w = module.weight.numel()
    if isinstance(V, Scattered) and isinstance(module, _CONV) and P_w * V.vals.shape[3] <= 2 * K * (P_w + V.shape[2]):
        weight = _gathered_weight_grads(module, x, V, args)
        bias = V.vals.sum(-1)
    else:
        Vr = dense(V).reshape(n, K, *y_shape)
        weight = _dense_weight_grads(module, x, Vr, args)
        bias = Vr.reshape(n, K, module.out_channels, -1).sum(-1)
    parts = {"weight": weight.reshape(n, K, -1), "bias": bias}
    return torch.cat([parts[p.rsplit(".", 1)[-1]] for p in step.params], dim=2)


def _dense_weight_grads(module, x: torch.Tensor, Vr: torch.Tensor, args) -> torch.Tensor:
    """The weight part of ``conv_factor_grads`` from dense factors ``(n, K, O, *out)``."""
    n, K, g = x.shape[0], Vr.shape[1], module.groups
    if isinstance(module, _CONV):
        Xu = unfold(x, *args).reshape(n, g, module.in_channels // g, _prod(module.kernel_size), -1)
        Vg = Vr.reshape(n, K, g, module.out_channels // g, -1)
        return torch.einsum("nkgop,ngcqp->nkgocq", Vg, Xu)  # (n, K, g, O/g, C/g, κ)
    Vu = unfold(Vr.reshape(n * K, *Vr.shape[2:]), *args)  # (nK, O, *k, *in)
    Vu = Vu.reshape(n, K, g, module.out_channels // g, _prod(module.kernel_size), -1)
    Xg = x.reshape(n, g, module.in_channels // g, -1)
    return torch.einsum("ngcp,nkgoqp->nkgcoq", Xg, Vu)  # (n, K, g, C/g, O/g, κ)


_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def pool_indices(step, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The flat positions of a max-pool's maxima, ``(n, C, D_y / C)``; None for other steps."""
    module = step.module
    if not isinstance(module, _POOL):
        return None
    pool = getattr(F, f"max_pool{x.ndim - 2}d")
    _, idx = pool(
        x,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        ceil_mode=module.ceil_mode,
        return_indices=True,
    )
    return idx.reshape(x.shape[0], x.shape[1], -1)


def transpose_many(step, x: torch.Tensor, state, C: torch.Tensor, idx=None) -> Optional[torch.Tensor]:
    """``Jₓᵀ c`` for many cotangents ``(n, K, D_y) -> (n, K, D_x)`` of a convolution or max-pool.

    Convolution: the input gradient (``torch.nn.grad.conv*_input``) with the n·K
    cotangents as the batch; transposed convolution: the convolution with the same
    kernel; max-pool: a scatter of each cotangent to the positions of the maxima
    (``idx`` from ``pool_indices``, computed here when not given). None for other
    steps (the caller uses VJPs).
    """
    module, n, K = step.module, C.shape[0], C.shape[1]
    if isinstance(module, _POOL):
        idx = pool_indices(step, x) if idx is None else idx
        return Scattered(C.reshape(n, K, x.shape[1], -1), idx, x[0, 0].numel()).dense()
    if not _supported(module) or x.ndim != len(module.kernel_size) + 2:
        return None
    y_shape = (module.out_channels, *_shape(module, x))
    if _prod(y_shape) != C.shape[2]:
        return None
    W = state[step.prefix + "weight"]
    m = len(module.kernel_size)
    Cb = C.reshape(n * K, *y_shape)
    args = (module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, _CONV):
        grad_input = getattr(torch.nn.grad, f"conv{m}d_input")
        out = grad_input((n * K, *x.shape[1:]), W, Cb, *args)
    else:
        out = getattr(F, f"conv{m}d")(Cb, W, None, *args)
    return out.reshape(n, K, -1)


def _prod(t) -> int:
    out = 1
    for v in t:
        out *= v
    return out


def _shape(module, x: torch.Tensor):
    """The output's spatial size (default ``output_size`` for transposed convolutions)."""
    m = len(module.kernel_size)
    S = x.shape[2 : 2 + m]
    out = []
    for i in range(m):
        k, s, p, d = module.kernel_size[i], module.stride[i], module.padding[i], module.dilation[i]
        if isinstance(module, _CONV):
            out.append((S[i] + 2 * p - d * (k - 1) - 1) // s + 1)
        else:
            out.append((S[i] - 1) * s - 2 * p + d * (k - 1) + module.output_padding[i] + 1)
    return out
