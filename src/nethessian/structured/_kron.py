"""The dense Hessian when every chosen parameter sits in an ``nn.Linear``: Kronecker factors.

**Setting.** A Linear step computes ``z_{t,i} = Σ_p W[i,p] a_{t,p} + b_i`` at every
leading position t of a sample (T positions; ``a``: its input, ``z``: its output).
With a 1 appended to the input, ``ā = [a, 1]``, and ``Θ = [W | b]`` (the chosen
columns only), ``∂z_{t,i}/∂Θ[i',p] = δ_{ii'} ā_{t,p}``: the parameter Jacobian is
``I ⊗ āᵀ`` and never needs to be formed.

**One block.** ``_backprop`` undoes the steps backwards and, when it undoes a
parameterised step l (frontier at ``z_l``), adds ``Σ_n J_θ,nᵀ K_n`` to the rows of Θ_l,
where ``K = ∂²ℓ/∂z_l∂Θ_k`` holds the mixed derivatives with every layer k undone
before (and ``K = H_{z_l z_l} J_θ,l`` for the diagonal block). With the Jacobian above,

    H[Θ_l[j,q], Θ_k[i,p]] = Σ_n Σ_s ā_{l,n,s,q} K_n[(s,j), (i,p)],

one GEMM over the samples (and positions) per pair of layers: ``ā_lᵀ`` (p_l × nT)
times K (nT × d_l·d_k·p_k), N·P_l·P_k multiply-adds, N·P²/2 for the whole matrix
(the other half is its transpose) instead of a product with the Jacobians per output.

**K in factors.** Instead of K (D_F × P_k per sample, P_k columns for every layer
undone) the frontier carries two narrow matrices per layer k, ``R_k`` (D_F × T_k d_k)
and ``G_k`` (D_F × T_k a_k-features), with

    K_{F,k}[f, (i,p)] = Σ_t R_k[f,(t,i)] ā_{k,t,p} + [p is a weight column] Σ_t G_k[f,(t,p)] g_{k,t,i},

``g_k = ∂ℓ/∂z_k``. Proof: when k is undone (frontier R ∪ {z_k} → R ∪ {a_k}),
``_backprop``'s update is ``K_{r,k} = H_{r z_k} J_θ`` for the other live tensors r and
``K_{a_k,k} = Jₓᵀ H_{z_k z_k} J_θ + ∂²(g_kᵀ z_k)/∂a_k∂Θ_k``; since
``∂²(Σ_{t,i} g_{t,i} Σ_p W[i,p] a_{t,p})/∂a_{t,p}∂W[i,p'] = g_{t,i} δ_{pp'}``, this is the form
above with ``R_k = [H_{R z_k} ; Jₓᵀ H_{z_k z_k}]`` (the frontier's columns at z_k,
pulled back) and ``G_k = [0 ; I]``. Every later step changes K through its rows only
(``K ↦ Jᵀ K`` on the replaced tensor, rows added where a tensor is used twice), and
K is linear in the rows of R_k and G_k, so they are carried with the same updates:
the whole joint-frontier machinery (branches, residual additions, smooth and
parameter-free steps) works unchanged on D_F × Σ_k T_k(d_k + a_k) columns.

**The two-layer network** (``docs/two-layer-hessian.md``: z2 = X W1, a2 = f(z2),
z3 = a2 W2). At the frontier z2, R_2 = f'(z2) ⊙ W2 H_{z3} and G_2 = diag f'(z2), so
``b_(ij),k = Σ_n x_ni f'(z2_nj) (W2_j H_{z3,n} a2_nk + δ_jk δ3_n)`` — the page's two terms,
the second being the bilinear term the brief calls δ ⊗ ∂a/∂θ. The diagonal blocks
use ``H_{z2} = f'f' W2 H_{z3} W2ᵀ + diag(δ2-type g ⊙ f'')`` from the recursion, so the
activation's second derivative enters through the frontier's Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Set, Tuple

import torch
from torch import nn

__all__ = ["KroneckerAccumulator", "kron_reason", "kron_sizes"]


def kron_reason(plan) -> Optional[str]:
    """None when every step with chosen parameters is a one-input ``nn.Linear``, else why not."""
    for step in plan.steps:
        if step.params and not (isinstance(step.module, nn.Linear) and len(step.inputs) == 1):
            return f"{step.label} has chosen parameters and is not an nn.Linear"
    return None


def _chosen(step) -> Tuple[bool, bool]:
    return step.prefix + "weight" in step.params, step.prefix + "bias" in step.params


def kron_sizes(plan, env) -> Tuple[int, int, int]:
    """From a one-sample forward: ``(carried columns, largest K per sample, largest block)`` in entries."""
    layers = []
    for step in plan.steps:
        if not step.params:
            continue
        m = step.module
        T = env[step.inputs[0]][0].numel() // m.in_features
        w, b = _chosen(step)
        layers.append((T, m.out_features, m.in_features if w else 0, (m.in_features if w else 0) + int(b)))
    cols = sum(T * d + T * a for T, d, a, _ in layers)
    k_per_sample = max((Tl * dl * dk * pk for Tl, dl, _, _ in layers for _, dk, _, pk in layers), default=0)
    block = max((dl * pl * dk * pk for _, dl, _, pl in layers for _, dk, _, pk in layers), default=0)
    return cols, k_per_sample, block


@dataclass
class _Layer:
    """One Linear layer on a chunk: its chosen parts, ``ā`` (n, T, p), ``g`` (n, T, d) and carried columns."""

    parts: List[Tuple[str, slice]]
    a: torch.Tensor
    g: torch.Tensor
    d_in: int
    r: Optional[slice] = None
    G: Optional[slice] = None


def _layer(u) -> _Layer:
    step, x = u.step, u.xs[0]
    m = step.module
    n, (w, b) = x.shape[0], _chosen(step)
    xt = x.reshape(n, -1, m.in_features)
    parts, feats = [], []
    if w:
        parts.append((step.prefix + "weight", slice(0, m.in_features)))
        feats.append(xt)
    if b:
        off = m.in_features if w else 0
        parts.append((step.prefix + "bias", slice(off, off + 1)))
        feats.append(xt.new_ones(n, xt.shape[1], 1))
    return _Layer(
        parts, torch.cat(feats, dim=2), u.gy.reshape(n, xt.shape[1], m.out_features), m.in_features if w else 0
    )


class KroneckerAccumulator:
    """The dense Hessian of one batch from factored columns (see the module docstring)."""

    def __init__(self, layout, dtype, device):
        self.layout = layout
        self.dense = torch.zeros(layout.size, layout.size, dtype=dtype, device=device)
        self.done: List[_Layer] = []
        self.width = 0
        self.mirror: Set[Tuple[str, str]] = set()

    def start_chunk(self) -> None:
        """A new chunk's frontier carries no columns yet."""
        self.done, self.width = [], 0

    def parameters(self, u) -> torch.Tensor:
        """Blocks of this layer with itself and every layer undone before; its new columns R, G."""
        cur = _layer(u)
        for k in self.done:
            self._block(cur, k, u.Ky[:, :, k.r], None if k.G is None else u.Ky[:, :, k.G])
        self._block(cur, cur, u.Hyy, None)
        n, Dy, Dx = u.HJ.shape
        cols = [torch.cat([u.Hry, u.HJ.transpose(1, 2)], dim=1)]
        cur.r = slice(self.width, self.width + Dy)
        self.width += Dy
        if cur.d_in and u.wrt:
            eye = torch.eye(Dx, dtype=u.HJ.dtype, device=u.HJ.device).expand(n, Dx, Dx)
            cols.append(torch.cat([u.Hry.new_zeros(n, u.Hry.shape[1], Dx), eye], dim=1))
            cur.G = slice(self.width, self.width + Dx)
            self.width += Dx
        self.done.append(cur)
        return torch.cat(cols, dim=2)

    def _block(self, cur: _Layer, k: _Layer, R: torch.Tensor, G: Optional[torch.Tensor]) -> None:
        """``H[Θ_cur, Θ_k] += Σ_{n,s} ā_cur ⊗ K`` with ``K`` from the factors ``R``, ``G`` at z_cur."""
        n, T_l, d_l = cur.g.shape
        _, T_k, d_k = k.g.shape
        p_l, p_k = cur.a.shape[2], k.a.shape[2]
        K = torch.einsum("nsjti,ntp->jnsip", R.reshape(n, T_l, d_l, T_k, d_k), k.a).contiguous()
        if G is not None:
            G5 = G.reshape(n, T_l, d_l, T_k, k.d_in)
            K[..., : k.d_in] += torch.einsum("nsjtp,nti->jnsip", G5, k.g)
        A = cur.a.reshape(n * T_l, p_l).T
        block = torch.matmul(A, K.reshape(d_l, n * T_l, d_k * p_k)).reshape(d_l, p_l, d_k, p_k)
        for rname, rq in cur.parts:
            for cname, cp in k.parts:
                dst = self.dense[self.layout.slice(rname), self.layout.slice(cname)]
                dst.view(d_l, rq.stop - rq.start, d_k, cp.stop - cp.start).add_(block[:, rq, :, cp])
                if k is not cur:
                    self.mirror.add((rname, cname))

    def result(self) -> torch.Tensor:
        """The batch's dense matrix: the blocks below the diagonal copied from above it."""
        for r, c in self.mirror:
            self.dense[self.layout.slice(c), self.layout.slice(r)] = self.dense[
                self.layout.slice(r), self.layout.slice(c)
            ].T
        self.mirror.clear()
        return self.dense
