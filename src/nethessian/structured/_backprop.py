"""Second-order backpropagation over a graph: the joint Hessian of the live tensors.

Walk the steps backwards. Before step ``y = f(x; θ)`` is undone, the *frontier* F
holds every tensor that is computed and still to be consumed, with, per sample,
the gradient ``g_F = ∂ℓ/∂F``, the Hessian ``H_FF`` and (dense mode) the mixed
derivatives ``K_F = ∂²ℓ/∂F∂θ_done`` with the parameters of the steps already
undone. Undoing the step replaces y by x (F = R ∪ {y} → F' = R ∪ {x}):

    H_F'F' = [[H_RR,      H_Ry J],
              [Jᵀ H_yR,   Jᵀ H_yy J + Σ_k g_{y,k} ∇²_x f_k]],      g_x = Jᵀ g_y,
    K_F'   = [[K_R, H_Ry J_θ], [Jᵀ K_y, Jᵀ H_yy J_θ + ∂²(g_yᵀf)/∂x∂θ]],

and yields the parameter rows of the Hessian (f is linear in θ, so ∇²_θ f = 0):

    H_θθ += Σ_n J_θ,nᵀ H_yy,n J_θ,n,      H_θ,done += Σ_n J_θ,nᵀ K_y,n.

An x that R already holds (a branch: the same tensor used twice, as in a residual
block ``x + g(x)``) gets its two rows and columns added: the Hessian of the sum of
both uses, cross terms between the branches included. That is why the frontier
carries the *joint* Hessian and not one per tensor (which is all BackPACK's
module-by-module recursion keeps, and why it stops at ``nn.Sequential``).

For a chain (``nn.Sequential``) F is one tensor and this is Bishop's (1992)
recursion; the δ terms of ``docs/two-layer-hessian.md`` are its entries.

The frontier carries K as *columns* whose rows follow F: every step maps them by
``K_F' = [K_R ; Jᵀ K_y]`` and a parameterised step's accumulator appends its own.
``Accumulator`` appends K itself (P_θ columns from per-sample ``J_θ``);
``_kron.KroneckerAccumulator`` appends, for a dense layer, two narrow factors from
which K is rebuilt per pair of layers (far fewer columns, no ``J_θ``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ._jacobians import Pull, mixed, param_jacobian, residual

__all__ = ["Accumulator", "Frontier", "Undo", "undo_step"]


class Frontier:
    """Per-sample ``g`` (n, D), ``H`` (n, D, D) and ``K`` (n, D, P_done) over named live tensors."""

    def __init__(self, name: str, g: torch.Tensor, H: torch.Tensor, dense: bool):
        self.names: List[str] = [name]
        self.sizes: List[int] = [g.shape[1]]
        self.g, self.H = g, H
        self.K = H.new_zeros(H.shape[0], H.shape[1], 0) if dense else None

    def index(self, name: str) -> Optional[torch.Tensor]:
        if name not in self.names:
            return None
        k = self.names.index(name)
        start = sum(self.sizes[:k])
        return torch.arange(start, start + self.sizes[k], device=self.H.device)

    def rest(self, name: str) -> torch.Tensor:
        keep = torch.ones(self.H.shape[1], dtype=torch.bool, device=self.H.device)
        keep[self.index(name)] = False
        return keep.nonzero().flatten()


def _merge(fr: Frontier, rest_names, rest_sizes, new_names, new_sizes, H, g, K) -> None:
    """Frontier over R ∪ X, adding the rows/columns of a tensor that appears twice."""
    names, sizes, where = list(rest_names), list(rest_sizes), []
    for nm, sz in zip(list(rest_names) + list(new_names), list(rest_sizes) + list(new_sizes)):
        if nm not in names:
            names.append(nm)
            sizes.append(sz)
        k = names.index(nm)
        start = sum(sizes[:k])
        where.append(torch.arange(start, start + sz, device=H.device))
    idx = torch.cat(where) if where else torch.zeros(0, dtype=torch.long, device=H.device)
    D = sum(sizes)
    n = H.shape[0]
    Hn = H.new_zeros(n, D, H.shape[2]).index_add_(1, idx, H)
    fr.H = H.new_zeros(n, D, D).index_add_(2, idx, Hn)
    fr.g = g.new_zeros(n, D).index_add_(1, idx, g)
    if K is not None:
        fr.K = K.new_zeros(n, D, K.shape[2]).index_add_(1, idx, K)
    fr.names, fr.sizes = names, sizes


def _add_residual(XX: torch.Tensor, R, offset: int) -> None:
    if R is None:
        return
    d = R.shape[1]
    block = XX[:, offset : offset + d, offset : offset + d]
    if R.ndim == 2:
        block.diagonal(dim1=1, dim2=2).add_(R)
    else:
        block.add_(R)


@dataclass
class Undo:
    """What a parameterised step hands its accumulator while it is undone (one chunk).

    ``Hyy``/``Hry``/``gy``: the frontier's Hessian blocks and gradient at the step's
    output y (R: the other live tensors); ``HJ = H_yy Jₓ`` (n, D_y, D_X); ``Ky``: the
    carried columns' rows at y (dense mode) or None; ``pull``: the step's ``Jₓᵀ``.
    """

    step: object
    xs: List[torch.Tensor]
    state: Dict[str, torch.Tensor]
    wrt: List[int]
    pull: Pull
    Hyy: torch.Tensor
    Hry: torch.Tensor
    HJ: torch.Tensor
    gy: torch.Tensor
    Ky: Optional[torch.Tensor]
    y: torch.Tensor


def _pull_columns(pull: Pull, C: torch.Tensor) -> torch.Tensor:
    """Rows of ``C`` (n, D_y, W) pulled back: ``Jₓᵀ C`` (n, D_X, W)."""
    return pull.apply(C.transpose(1, 2)).transpose(1, 2)


def undo_step(fr: Frontier, step, env: Dict[str, torch.Tensor], state, needs: Dict[str, bool], out) -> None:
    """Replace ``step``'s output by its inputs on the frontier; hand its parameter rows to ``out``.

    ``out.parameters(Undo)`` accumulates the step's Hessian rows and returns the new
    columns the frontier carries for it (rows: R then X), or None.
    """
    ys = fr.index(step.name)
    if ys is None:
        return
    rest = fr.rest(step.name)
    Hyy, Hry, gy = fr.H[:, ys][:, :, ys], fr.H[:, rest][:, :, ys], fr.g[:, ys]
    xs = [env[i] for i in step.inputs]
    wrt = [i for i, nm in enumerate(step.inputs) if needs.get(nm) and xs[i].is_floating_point()]
    pull = Pull(step, xs, state, wrt)
    HJ = pull.apply(Hyy)  # H_yy Jₓ (H_yy symmetric)
    K, newK = fr.K, None
    Ky = None if K is None else K[:, ys]
    if K is not None:
        newK = torch.cat([K[:, rest], _pull_columns(pull, Ky)], dim=1)
    if step.params:
        cols = out.parameters(Undo(step, xs, state, wrt, pull, Hyy, Hry, HJ, gy, Ky, env[step.name]))
        if cols is not None and newK is not None:
            newK = torch.cat([newK, cols], dim=2)
    XX = pull.apply(HJ.transpose(1, 2))
    if wrt and step.kind != "linear":
        _add_residual(XX, residual(step, xs, state, gy), 0)
    RX = pull.apply(Hry)
    H = torch.cat(
        [torch.cat([fr.H[:, rest][:, :, rest], RX], dim=2), torch.cat([RX.transpose(1, 2), XX], dim=2)], dim=1
    )
    g = torch.cat([fr.g[:, rest], pull.apply(gy[:, None, :])[:, 0]], dim=1)
    k = fr.names.index(step.name)
    rest_names, rest_sizes = fr.names[:k] + fr.names[k + 1 :], fr.sizes[:k] + fr.sizes[k + 1 :]
    _merge(fr, rest_names, rest_sizes, [step.inputs[i] for i in wrt], pull.sizes, H, g, newK)


class Accumulator:
    """Collects the parameter rows from per-sample ``J_θ``: ``mode`` is "diagonal", "blocks" or "dense".

    In dense mode the carried columns are ``K = ∂²ℓ/∂F∂θ_done`` themselves (the
    generic path; ``_kron`` carries them factored for Linear layers).
    """

    def __init__(self, mode: str, layout, dtype, device):
        self.mode, self.layout = mode, layout
        P = layout.size
        self.diag = torch.zeros(P, dtype=dtype, device=device)
        self.blocks: Dict[tuple, torch.Tensor] = {}
        self.dense = torch.zeros(P, P, dtype=dtype, device=device) if mode == "dense" else None
        self.done_idx = torch.zeros(0, dtype=torch.long, device=device)

    def start_chunk(self) -> None:
        """A new chunk's frontier starts with no parameters undone (K has no columns)."""
        self.done_idx = self.done_idx[:0]

    def parameters(self, u: Undo) -> Optional[torch.Tensor]:
        """Add the step's rows; in dense mode return its K columns ``[H_Ry J_θ ; Jₓᵀ H_yy J_θ + mixed]``."""
        from ._linear import linear_diagonal  # the closed form for nn.Linear

        step = u.step
        idx = self.layout.indices(list(step.params)).to(self.diag.device)
        if self.mode == "diagonal":
            fast = linear_diagonal(step, u.xs, u.Hyy, u.y)
            if fast is not None:
                self.diag[idx] += fast
                return None
        J = param_jacobian(step, u.xs, u.state, step.params)
        HJ = u.Hyy @ J
        if self.mode == "diagonal":
            self.diag[idx] += (J * HJ).sum(dim=(0, 1))
            return None
        block = torch.einsum("nap,naq->pq", J, HJ)
        if self.mode == "blocks":
            key = tuple(step.params)
            self.blocks[key] = self.blocks.get(key, 0) + block
            return None
        self.dense[idx[:, None], idx[None, :]] += block
        cross = torch.einsum("nap,nad->pd", J, u.Ky)
        self.dense[idx[:, None], self.done_idx[None, :]] += cross
        self.dense[self.done_idx[:, None], idx[None, :]] += cross.T
        self.done_idx = torch.cat([self.done_idx, idx])
        bottom = _pull_columns(u.pull, HJ)
        if u.wrt:
            bottom = bottom + mixed(step, u.xs, u.state, u.wrt, step.params, u.gy)
        return torch.cat([u.Hry @ J, bottom], dim=1)

    def result(self) -> torch.Tensor:
        """The dense matrix of this batch (dense mode)."""
        return self.dense
