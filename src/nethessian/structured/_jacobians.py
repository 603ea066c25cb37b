"""The per-node derivatives second-order backpropagation needs, all from ``torch.func``.

For a step ``y = f(x_1, …, x_m; θ)`` evaluated on a chunk of samples:

* ``Pull.apply(C)``: ``Cᵢ ↦ Jₓᵀ cᵢ`` for many cotangents per sample — ``C`` is
  ``(n, K, D_y)``, the result ``(n, K, D_X)`` (the differentiated inputs side by side).
  One ``vjp`` of the whole chunk is exact per sample because the step is per-sample;
  ``nn.Linear`` and element-wise steps use their Jacobians' closed forms instead.
  Since every H is symmetric, ``apply(H_yy)`` is ``H_yy Jₓ`` (row a: ``Jₓᵀ H_yy e_a``).
* ``param_jacobian``: ``J_θ`` per sample, ``(n, D_y, P_θ)`` (vmap of jacrev).
* ``residual``: ``Σ_k g_k ∇²_x f_k`` — zero (linear), a diagonal (element-wise) or
  per-sample dense (smooth); see ``_rules``.
* ``mixed``: ``∂²(gᵀf)/∂x∂θ`` per sample, ``(n, D_X, P_θ)``: the bilinear cross term.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.func import hessian, jacrev, vjp, vmap

__all__ = ["Pull", "param_jacobian", "residual", "mixed"]


def _with(xs: Sequence[torch.Tensor], wrt: Sequence[int], diff) -> List[torch.Tensor]:
    full = list(xs)
    for i, d in zip(wrt, diff):
        full[i] = d
    return full


class Pull:
    """Jacobian-transpose products of one step on a chunk, w.r.t. the inputs ``wrt``.

    Closed forms where the Jacobian is known: ``nn.Linear`` (``c ↦ c W`` at every
    leading position) and element-wise maps (``c ↦ c ⊙ σ'(x)``, σ' from one VJP of
    ones); any other step pulls each column through its own VJP (vmapped).
    """

    def __init__(self, step, xs: Sequence[torch.Tensor], state: Dict[str, torch.Tensor], wrt: Sequence[int]):
        self.n, self.wrt = xs[0].shape[0], list(wrt)
        self.sizes = [xs[i][0].numel() for i in wrt]
        self._weight = self._scale = None
        if not self.wrt:
            return
        y, self._pull = vjp(lambda *d: step.fn(_with(xs, wrt, d), state), *[xs[i] for i in wrt])
        self.y_shape = tuple(y.shape)
        if isinstance(step.module, nn.Linear) and self.wrt == [0]:
            self._weight = state[step.prefix + "weight"]
        elif step.kind == "elementwise" and self.wrt == [0]:
            (d,) = self._pull(torch.ones_like(y))
            self._scale = d.reshape(self.n, 1, -1)

    @property
    def width(self) -> int:
        return sum(self.sizes)

    def apply(self, C: torch.Tensor) -> torch.Tensor:
        """``(n, K, D_y) -> (n, K, D_X)``: each cotangent pulled back through the step."""
        n, K = C.shape[0], C.shape[1]
        if not self.wrt or K == 0:
            return C.new_zeros(n, K, self.width)
        if self._weight is not None:
            W = self._weight
            return (C.reshape(n, K, -1, W.shape[0]) @ W).reshape(n, K, -1)
        if self._scale is not None:
            return C * self._scale
        outs = vmap(self._pull, in_dims=1, out_dims=1)(C.reshape(n, K, *self.y_shape[1:]))
        return torch.cat([o.reshape(n, K, -1) for o in outs], dim=2)


def _per_sample(step, state, names):
    def f(thetas, *x_n):
        st = dict(state)
        st.update(zip(names, thetas))
        return step.fn([x.unsqueeze(0) for x in x_n], st).reshape(-1)

    return f


def param_jacobian(step, xs, state, names: Sequence[str]) -> torch.Tensor:
    """``J_θ`` per sample: ``(n, D_y, P_θ)`` with the parameters ``names`` side by side."""
    thetas = tuple(state[p] for p in names)
    jac = vmap(jacrev(_per_sample(step, state, names)), in_dims=(None,) + (0,) * len(xs))(thetas, *xs)
    n, D = jac[0].shape[0], jac[0].shape[1]
    return torch.cat([j.reshape(n, D, -1) for j in jac], dim=2)


def residual(step, xs, state, g_y: torch.Tensor):
    """``Σ_k g_k ∇²_x f_k`` on the step's single input: None, ``(n, D_x)`` diagonal or ``(n, D_x, D_x)``."""
    if step.kind == "linear":
        return None
    n = xs[0].shape[0]
    if step.kind == "elementwise":  # Hessian of gᵀσ(x) is diag(g ⊙ σ''): its row sums
        with torch.enable_grad():
            x = xs[0].detach().requires_grad_(True)
            y = step.fn([x], state)
            (s,) = torch.autograd.grad((g_y.reshape(y.shape) * y).sum(), x, create_graph=True)
            if not s.requires_grad:  # piecewise linear (ReLU): σ'' = 0
                return None
            (d,) = torch.autograd.grad(s.sum(), x, allow_unused=True)
        return None if d is None else d.reshape(n, -1)

    def one(x_n, g_n):
        return hessian(lambda x: (g_n * step.fn([x.unsqueeze(0)], state).reshape(-1)).sum())(x_n)

    Hs = vmap(one)(xs[0], g_y)
    return Hs.reshape(n, xs[0][0].numel(), -1)


def mixed(step, xs, state, wrt: Sequence[int], names: Sequence[str], g_y: torch.Tensor) -> torch.Tensor:
    """``∂²(g_nᵀ f(x_n; θ))/∂x_n∂θ`` per sample: ``(n, D_X, P_θ)``."""
    f = _per_sample(step, state, names)
    thetas = tuple(state[p] for p in names)

    def inner(ths, g_n, *x_n):
        def scal(*d):
            return (g_n * f(ths, *_with(x_n, wrt, d))).sum()

        return jacrev(scal, argnums=tuple(range(len(wrt))))(*[x_n[i] for i in wrt])

    per = vmap(jacrev(inner, argnums=0), in_dims=(None, 0) + (0,) * len(xs))(thetas, g_y, *xs)
    n = g_y.shape[0]
    rows = []
    for k, i in enumerate(wrt):  # per[k][j]: (n, *x_i, *θ_j)
        D_x = xs[i][0].numel()
        rows.append(torch.cat([per[k][j].reshape(n, D_x, -1) for j in range(len(names))], dim=2))
    return torch.cat(rows, dim=1)
