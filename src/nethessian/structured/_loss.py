"""Where second-order backpropagation starts: the loss's gradient and per-sample Hessian.

For a batch with model outputs ``Z`` (N × D per sample) and a loss that is a sum of
per-sample terms times a constant — ``L = c Σ_n ℓ(z_n, y_n)`` (mean: c = 1/N, or
1/ΣD for MSE, or 1/Σ w_{y_n} for weighted cross-entropy; ignored targets give ℓ = 0) —
the Hessian ∂²L/∂Z² is block diagonal over samples. Its blocks are read off
``D`` double-backward passes through the loss alone (row k: ∂/∂Z of Σ_n ∂L/∂z_{n,k}),
so every setting of these losses (class weights, ``ignore_index``, label smoothing,
``pos_weight``) is exact by construction, with nothing re-derived by hand.

Only losses known to be sums over samples are accepted: for any other, the
blocks would silently miss the coupling between samples.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["loss_reason", "loss_derivatives"]

_SEPARABLE = (nn.MSELoss, nn.CrossEntropyLoss, nn.NLLLoss, nn.BCEWithLogitsLoss)


def loss_reason(loss_fn) -> Optional[str]:
    """None when the loss is a supported sum over samples, else why not."""
    from ..examples import HalfSumSquaredError  # a plain sum over samples

    if isinstance(loss_fn, HalfSumSquaredError):
        return None
    if not isinstance(loss_fn, _SEPARABLE):
        return (
            f"loss {type(loss_fn).__name__} is not one the structured engine knows to be a sum over "
            "samples (MSELoss, CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss)"
        )
    if getattr(loss_fn, "reduction", "mean") not in ("mean", "sum"):
        return f"loss reduction {loss_fn.reduction!r}: needs 'mean' or 'sum'"
    return None


def loss_derivatives(loss_fn, outputs: torch.Tensor, targets) -> Tuple[torch.Tensor, torch.Tensor]:
    """``g`` (N, D) = ∂L/∂z_n and ``H`` (N, D, D) = ∂²L/∂z_n² for one batch, ``L = loss_fn(Z, y)``."""
    N = outputs.shape[0]
    with torch.enable_grad():
        z = outputs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(z, targets), z, create_graph=True)
        gf = g.reshape(N, -1)
        D = gf.shape[1]
        eye = torch.eye(D, dtype=gf.dtype, device=gf.device)[:, None, :].expand(D, N, D)
        if g.requires_grad:
            (rows,) = torch.autograd.grad(gf, z, grad_outputs=eye, is_grads_batched=True)
            H = rows.reshape(D, N, D).permute(1, 0, 2)
        else:  # a loss linear in the outputs
            H = torch.zeros(N, D, D, dtype=gf.dtype, device=gf.device)
    return gf.detach(), H.detach().contiguous()
