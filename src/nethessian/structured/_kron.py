"""The dense Hessian when every chosen parameter sits in a dense layer: Kronecker factors.

**Setting.** A dense layer computes ``z_{t,i} = Σ_p W[i,p] a_{t,p} + b_i`` at every
leading position t of a sample (T positions; ``a``: its input, ``z``: its output):
``nn.Linear`` and ``F.linear``, or ``x @ W`` with the weight stored transposed
(``W[p,i]``, no bias). With a 1 appended to the input, ``ā = [a, 1]``, and
``Θ = [W | b]`` (the chosen columns only), ``∂z_{t,i}/∂Θ[i',p] = δ_{ii'} ā_{t,p}``: the
parameter Jacobian is ``I ⊗ āᵀ`` and never needs to be formed.

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

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Form", "KroneckerAccumulator", "linear_forms", "kron_sizes"]

_MATMUL = (operator.matmul, torch.matmul)


@dataclass(frozen=True)
class Form:
    """A step ``z = a Wᵀ + b`` (``transposed``: ``z = a W``, as in ``x @ self.W``) with its chosen names."""

    weight: Optional[str]
    bias: Optional[str]
    transposed: bool
    d_in: int
    d_out: int


def _attr(node) -> Optional[str]:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _function_form(node: fx.Node, model: nn.Module, params) -> Optional[Form]:
    """``x @ W`` (W a 2-D parameter) or ``F.linear(x, W, b)`` on get_attr parameters; else None."""
    args = list(node.args) + [node.kwargs.get(k) for k in ("weight", "bias") if k in node.kwargs]
    if len(args) < 2 or _attr(args[0]) is not None or _attr(args[1]) is None:
        return None
    W = model.get_parameter(_attr(args[1])) if _attr(args[1]) in dict(model.named_parameters()) else None
    if W is None or W.ndim != 2:
        return None
    weight = _attr(args[1]) if _attr(args[1]) in params else None
    if node.target in _MATMUL and len(args) == 2:
        return Form(weight, None, True, W.shape[0], W.shape[1])
    if node.target is F.linear:
        bias = _attr(args[2]) if len(args) > 2 else None
        return Form(weight, bias if bias in params else None, False, W.shape[1], W.shape[0])
    return None


def linear_forms(plan, model: nn.Module) -> Tuple[Dict[str, Form], Optional[str]]:
    """Every parameterised step's ``Form``, or ``({}, why not)`` when one is not a dense layer.

    ``nn.Linear`` modules are read off the plan; ``x @ W`` and ``F.linear`` need the
    traced node's arguments (which operand is the parameter), so the model is traced
    again only when such a step has chosen parameters.
    """
    forms, nodes = {}, None
    for step in plan.steps:
        if not step.params:
            continue
        m = step.module
        if isinstance(m, nn.Linear) and len(step.inputs) == 1:
            w, b = step.prefix + "weight", step.prefix + "bias"
            forms[step.name] = Form(
                w if w in step.params else None, b if b in step.params else None, False, m.in_features, m.out_features
            )
            continue
        if m is None and nodes is None:
            nodes = {n.name: n for n in fx.symbolic_trace(model).graph.nodes}
        form = None if m is not None else _function_form(nodes[step.name], model, step.params)
        if form is None:
            return {}, f"{step.label} has chosen parameters and is not a dense layer (nn.Linear, x @ W, F.linear)"
        forms[step.name] = form
    return forms, None


def kron_sizes(plan, env, forms: Dict[str, Form]) -> Tuple[int, int, int]:
    """From a one-sample forward: ``(carried columns, largest K per sample, largest block)`` in entries."""
    layers = []
    for step in plan.steps:
        if step.name in forms:
            f = forms[step.name]
            T = env[step.inputs[0]][0].numel() // f.d_in
            a = f.d_in if f.weight else 0
            layers.append((T, f.d_out, a, a + int(f.bias is not None)))
    cols = sum(T * d + T * a for T, d, a, _ in layers)
    k_per_sample = max((Tl * dl * dk * pk for Tl, dl, _, _ in layers for _, dk, _, pk in layers), default=0)
    block = max((dl * pl * dk * pk for _, dl, _, pl in layers for _, dk, _, pk in layers), default=0)
    return cols, k_per_sample, block


@dataclass
class _Layer:
    """One dense layer on a chunk: chosen parts (name, ā columns, transposed), ``ā`` (n, T, p), ``g`` (n, T, d)."""

    parts: List[Tuple[str, slice, bool]]
    a: torch.Tensor
    g: torch.Tensor
    d_in: int
    r: Optional[slice] = None
    G: Optional[slice] = None


def _layer(u, f: Form) -> _Layer:
    x = u.xs[0]
    n = x.shape[0]
    xt = x.reshape(n, -1, f.d_in)
    parts, feats = [], []
    if f.weight:
        parts.append((f.weight, slice(0, f.d_in), f.transposed))
        feats.append(xt)
    if f.bias:
        off = f.d_in if f.weight else 0
        parts.append((f.bias, slice(off, off + 1), False))
        feats.append(xt.new_ones(n, xt.shape[1], 1))
    return _Layer(parts, torch.cat(feats, dim=2), u.gy.reshape(n, xt.shape[1], f.d_out), f.d_in if f.weight else 0)


def _oriented(block: torch.Tensor, rows_t: bool, cols_t: bool) -> torch.Tensor:
    """``(j, q, i, p)`` → the parameters' own index order (a transposed weight is stored ``(q, j)``)."""
    if rows_t:
        block = block.transpose(0, 1)
    if cols_t:
        block = block.transpose(2, 3)
    return block


class KroneckerAccumulator:
    """The dense Hessian of one batch from factored columns (see the module docstring)."""

    def __init__(self, layout, dtype, device, forms: Dict[str, Form]):
        self.layout, self.forms = layout, forms
        self.dense = torch.zeros(layout.size, layout.size, dtype=dtype, device=device)
        self.done: List[_Layer] = []
        self.width = 0
        self.mirror: Set[Tuple[str, str]] = set()

    def start_chunk(self) -> None:
        """A new chunk's frontier carries no columns yet."""
        self.done, self.width = [], 0

    def parameters(self, u) -> torch.Tensor:
        """Blocks of this layer with itself and every layer undone before; its new columns R, G."""
        cur = _layer(u, self.forms[u.step.name])
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
        for rname, rq, rt in cur.parts:
            for cname, cp, ct in k.parts:
                src = _oriented(block[:, rq, :, cp], rt, ct)
                self.dense[self.layout.slice(rname), self.layout.slice(cname)].view(src.shape).add_(src)
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
