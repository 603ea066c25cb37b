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
z3 = a2 W2, no biases). At the frontier z2, ``R = f'(z2) ⊙ W2 H_{z3}`` and
``G = diag f'(z2)``, so ``b_(ij),k = Σ_n x_ni f'(z2_nj) (W2_j H_{z3,n} a2_nk + δ_jk δ3_n)``:
the page's two terms, the second the bilinear one (δ3 times ∂a2/∂W1). The diagonal
blocks use the frontier's Hessian ``H_{z2} = (f' ⊙ W2) H_{z3} (f' ⊙ W2)ᵀ + diag(δ3 W2 ⊙ f'')``,
through which the activation's second derivative enters.

**Cost and memory.** Per pair and chunk, K is built for a quarter of cur's output
units at a time in a reused buffer; the GEMMs write straight into the dense matrix
(strided views, no output buffer); a parameter's own block gets only its upper
block-triangle and blocks of two layers only one orientation, the rest copied at the
end. All batches add into one matrix (the batch weight rides on the loss
derivatives), so the peak is the matrix plus one chunk (``StructuredEngine``). For
the MLP 64-48-32-10 at N=512: about 6.4e9 multiply-adds.
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
SLICES = 4  # K is built for a quarter of a layer's output units at a time


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


def kron_sizes(plan, env, forms: Dict[str, Form]) -> Tuple[Dict[str, int], int]:
    """From a one-sample forward, in entries: ``({step: columns it adds}, K per sample)``.

    K (the largest pair's weight columns, for a quarter of the output units) is
    written into a reused buffer; with leading dimensions ``einsum`` makes up to three
    such tensors. The GEMMs write straight into the dense matrix (no output buffer).
    """
    layers, cols = [], {}
    for step in plan.steps:
        if step.name in forms:
            f = forms[step.name]
            T = env[step.inputs[0]][0].numel() // f.d_in
            a = f.d_in if f.weight else 0
            layers.append((T, f.d_out, a))
            cols[step.name] = T * (f.d_out + a)
    copies = 1 if all(T == 1 for T, _, _ in layers) else 3
    k_sample = max(
        (copies * Tl * -(-dl // SLICES) * Tk * dk * (ak + 1) for Tl, dl, _ in layers for Tk, dk, ak in layers),
        default=0,
    )
    return cols, k_sample


@dataclass
class _Layer:
    """One dense layer on a chunk: its form, input ``x`` (n, T, d_in), ``g = ∂ℓ/∂z`` (n, T, d_out), columns."""

    f: Form
    x: torch.Tensor
    g: torch.Tensor
    r: Optional[slice] = None
    G: Optional[slice] = None


def _layer(u, f: Form) -> _Layer:
    n = u.xs[0].shape[0]
    x = u.xs[0].reshape(n, -1, f.d_in)
    return _Layer(f, x, u.gy.reshape(n, x.shape[1], f.d_out))


def _weight_k(d_l: int, k: _Layer, R: torch.Tensor, G: Optional[torch.Tensor], scratch) -> torch.Tensor:
    """``K[j, n, i, p] = R[n, j, i] x_k[n, p] + G[n, j, p] g_k[n, i]`` (one position), ``(p, i)`` if transposed.

    Written into ``scratch(numel)``, a buffer reused across pairs and chunks (no fresh
    pages per chunk), in the GEMM's layout.
    """
    n, _, d_in = k.x.shape
    d_k = k.g.shape[2]
    tr = k.f.transposed
    K = scratch(d_l * n * d_in * d_k).view((d_l, n, d_in, d_k) if tr else (d_l, n, d_k, d_in))
    Rj = R.reshape(n, d_l, d_k).transpose(0, 1)  # (j, n, i)
    x, g = k.x.reshape(1, n, d_in), k.g.reshape(1, n, d_k)
    if tr:
        torch.mul(Rj[:, :, None, :], x[..., None], out=K)
    else:
        torch.mul(Rj[..., None], x[:, :, None, :], out=K)
    if G is not None:
        Gj = G.reshape(n, d_l, d_in).transpose(0, 1)  # (j, n, p)
        if tr:
            K.addcmul_(Gj[..., None], g[:, :, None, :])
        else:
            K.addcmul_(Gj[:, :, None, :], g[..., None])
    return K


def _columns(cur: _Layer, k: _Layer, R: torch.Tensor, G: Optional[torch.Tensor], scratch, rows: slice):
    """``[(name, K (d, n·T_l, cols))]`` per chosen part of layer k for the output units ``rows`` of cur.

    ``K_{z_cur, k}[(s,j), (i,p)] = Σ_t R[(s,j),(t,i)] x_k[t,p] + Σ_t G[(s,j),(t,p)] g_k[t,i]`` for the
    weight, ``Σ_t R[(s,j),(t,i)]`` for the bias (its feature is the constant 1); columns in
    the parameter's layout order.
    """
    n, T_l, d_l = cur.g.shape
    _, T_k, d_k = k.g.shape
    R5 = R.reshape(n, T_l, d_l, T_k, d_k)[:, :, rows]
    if G is not None:
        G = G.reshape(n, T_l, d_l, T_k, -1)[:, :, rows]
    d_l = rows.stop - rows.start
    out = []
    if k.f.weight and T_l == T_k == 1:
        out.append((k.f.weight, _weight_k(d_l, k, R5, G, scratch).reshape(d_l, n, -1)))
    elif k.f.weight:
        spec = "jnspi" if k.f.transposed else "jnsip"
        K = torch.einsum(f"nsjti,ntp->{spec}", R5, k.x)
        if G is not None:
            K = K + torch.einsum(f"nsjtp,nti->{spec}", G, k.g)
        out.append((k.f.weight, K.reshape(d_l, n * T_l, -1)))
    if k.f.bias:
        out.append((k.f.bias, R5.sum(3).permute(2, 0, 1, 3).reshape(d_l, n * T_l, d_k)))
    return out


def _rows(cur: _Layer):
    """``[(name, A (q, n·T), transposed)]``: each chosen part's features (the input; 1 for the bias)."""
    n, T, d_in = cur.x.shape
    out = []
    if cur.f.weight:
        out.append((cur.f.weight, cur.x.reshape(n * T, d_in).T, cur.f.transposed))
    if cur.f.bias:
        out.append((cur.f.bias, cur.x.new_ones(1, n * T), False))
    return out


class KroneckerAccumulator:
    """The dense Hessian of one batch from factored columns (see the module docstring)."""

    def __init__(self, layout, dtype, device, forms: Dict[str, Form]):
        self.layout, self.forms = layout, forms
        self.dense = torch.zeros(layout.size, layout.size, dtype=dtype, device=device)
        self.done: List[_Layer] = []
        self.width = 0
        self.mirror: Set[Tuple[str, str]] = set()
        self.triangles: Set[Tuple[str, int, int]] = set()
        self._buffer: Optional[torch.Tensor] = None

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
        if cur.f.weight and u.wrt:
            eye = torch.eye(Dx, dtype=u.HJ.dtype, device=u.HJ.device).expand(n, Dx, Dx)
            cols.append(torch.cat([u.Hry.new_zeros(n, u.Hry.shape[1], Dx), eye], dim=1))
            cur.G = slice(self.width, self.width + Dx)
            self.width += Dx
        self.done.append(cur)
        return torch.cat(cols, dim=2)

    def _block(self, cur: _Layer, k: _Layer, R: torch.Tensor, G: Optional[torch.Tensor]) -> None:
        """``H[Θ_cur, Θ_k] += Σ_{n,s} features_cur ⊗ K``: GEMMs straight into the dense matrix.

        A parameter's own block gets its upper block-triangle only (rows j, columns i ≥ j
        of the output units); ``result`` copies the rest from it.
        """
        d_l = cur.g.shape[2]
        step = -(-d_l // SLICES)
        for j0 in range(0, d_l, step):
            rows = slice(j0, min(d_l, j0 + step))
            for cname, K in _columns(cur, k, R, G, self._scratch, rows):
                for rname, A, rt in _rows(cur):
                    self._gemm(self._out(rname, cname, A.shape[0], d_l, rt), A, K, rows, rname == cname and not rt)
                    if rname == cname and not rt:
                        self.triangles.add((rname, d_l, A.shape[0]))
                    if k is not cur:
                        self.mirror.add((rname, cname))

    def _out(self, rname: str, cname: str, q: int, d_l: int, rt: bool) -> torch.Tensor:
        """The dense matrix's block ``rname`` × ``cname`` as a ``(j, q, cols)`` view."""
        out = self.dense[self.layout.slice(rname), self.layout.slice(cname)]
        return out.view(q, d_l, -1).transpose(0, 1) if rt else out.view(d_l, q, -1)

    @staticmethod
    def _gemm(out: torch.Tensor, A: torch.Tensor, K: torch.Tensor, rows: slice, triangle: bool) -> None:
        """``out[j] += A K[j]`` for the units ``rows``; a parameter's own block: columns i ≥ j only."""
        if not triangle:
            out[rows].baddbmm_(A.expand(K.shape[0], *A.shape), K)
            return
        q = A.shape[0]
        for j in range(rows.start, rows.stop):
            out[j, :, j * q :].addmm_(A, K[j - rows.start, :, j * q :])

    def _scratch(self, numel: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = None
            self._buffer = self.dense.new_empty(numel)
        return self._buffer[:numel]

    def result(self) -> torch.Tensor:
        """The batch's dense matrix: lower block-triangles and the blocks below the diagonal by symmetry."""
        for name, d, q in self.triangles:
            V = self.dense[self.layout.slice(name), self.layout.slice(name)].view(d, q, d, q)
            for j in range(1, d):
                V[j, :, :j, :] = V[:j, :, j, :].permute(2, 0, 1)
        for r, c in self.mirror:
            self.dense[self.layout.slice(c), self.layout.slice(r)] = self.dense[
                self.layout.slice(r), self.layout.slice(c)
            ].T
        self.mirror.clear()
        self.triangles.clear()
        self._buffer = None
        return self.dense
