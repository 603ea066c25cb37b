"""Closed form for ``nn.Linear``'s diagonal: no per-sample Jacobian needed.

``y_t = W x_t + b`` at every leading position t of a sample (``x``: ``(*lead, in)``).
Then ``∂y_{t,j}/∂W_{j',i} = δ_{jj'} x_{t,i}``, so

    diag(H_W)[j, i] = Σ_n Σ_{t,s} H_{y,n}[(t,j),(s,j)] x_{n,t,i} x_{n,s,i},
    diag(H_b)[j]    = Σ_n Σ_{t,s} H_{y,n}[(t,j),(s,j)];

without leading dimensions this is ``Σ_n H_{y,n}[j,j] x_{n,i}²`` — one matrix
product of diag(H_y) with the squared inputs (Dangel et al. 2020, DiagHessian).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["linear_diagonal"]


def linear_diagonal(step, xs, Hyy: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
    """The diagonal of the step's chosen parameters for an ``nn.Linear``; None for other steps."""
    module = step.module
    if not isinstance(module, nn.Linear):
        return None
    x = xs[0]
    n, C_out = x.shape[0], module.out_features
    xt = x.reshape(n, -1, module.in_features)
    T = xt.shape[1]
    Hd = torch.diagonal(Hyy.reshape(n, T, C_out, T, C_out), dim1=2, dim2=4)  # (n, T, T, C_out)
    if T == 1:
        Hj = Hd[:, 0, 0, :]
        wdiag = Hj.T @ xt[:, 0, :].square()
    else:
        wdiag = torch.einsum("ntsj,nti,nsi->ji", Hd, xt, xt)
    parts = {"weight": wdiag.reshape(-1), "bias": Hd.sum(dim=(0, 1, 2))}
    return torch.cat([parts[p.rsplit(".", 1)[-1]] for p in step.params])
